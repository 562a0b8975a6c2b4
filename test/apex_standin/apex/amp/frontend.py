"""Stand-in for ``apex/amp/frontend.py`` (NVIDIA apex 4ef930c1 + Ascend npu.patch, Ascend/apex master 49a7994e):
``Properties``, the O0-O3 presets, ``initialize``, ``state_dict``, ``load_state_dict``.

Real signature (Ascend fork, also in its README.zh.md section 4.1.1)::

    initialize(models, optimizers=None, enabled=True, opt_level="O1", cast_model_type=None,
               patch_torch_functions=None, keep_batchnorm_fp32=None, master_weights=None, loss_scale=None,
               cast_model_outputs=None, num_losses=1, verbosity=1, dynamic_init_scale=2.**16,
               scale_growth_factor=2., scale_backoff_factor=0.5, scale_window=2000, min_loss_scale=None,
               max_loss_scale=2.**24, combine_grad=None, combine_ddp=None, ddp_replica_count=4,
               user_cast_preferred=None, check_combined_tensors=None)

Presets (cast_model_type, patch_torch_functions, keep_batchnorm_fp32, master_weights, loss_scale):
O0 (fp32, False, None, False, 1.0); O1 (None, True, None, None, "dynamic");
O2 (fp16, False, True, True, "dynamic"); O3 (fp16, False, False, False, 1.0).
User overrides go through the same consistency checks as the real Properties (RuntimeError via warn_or_err),
including the fork's "combine_grad=True ... should only be set by selecting opt_level='O1' or opt_level='O2'".

state_dict layout: ``OrderedDict(loss_scaler0={'loss_scale': float, 'unskipped': int}, ...)``.
load_state_dict: prints a warning on a count mismatch, RuntimeError on keys without 'loss_scaler'.

Simplified: no cudnn-enabled check; combine_ddp=True raises NotImplementedError (the real one broadcasts the
params and replaces DDP with combined-gradient all-reduces); user_cast_preferred is accepted and ignored.
"""
from collections import OrderedDict

import torch

from ._amp_state import _amp_state, maybe_print, warn_or_err
from ._initialize import _initialize


class Properties(object):
    def __init__(self):
        self.options = {
            "enabled": False,
            "opt_level": None,
            "cast_model_type": None,
            "patch_torch_functions": False,
            "keep_batchnorm_fp32": None,
            "master_weights": None,
            "loss_scale": 1.0,
            "combine_grad": None,
            "combine_ddp": None,
            "ddp_replica_count": 4,
            "check_combined_tensors": None,
            "user_cast_preferred": None,
        }

    def __getattr__(self, name):
        options = self.__dict__.get("options", {})
        if name in options:
            return options[name]
        raise AttributeError("'{}' object has no attribute '{}'".format(type(self).__name__, name))

    def __setattr__(self, name, value):
        if "options" not in self.__dict__ or name not in self.options:
            return super(Properties, self).__setattr__(name, value)
        if name == "cast_model_type":
            if self.opt_level == "O1" and value is not None and value is not False and value is not torch.float32:
                warn_or_err("O1 inserts casts around Torch functions rather than model weights, so with O1, the "
                            "model weights themselves should remain FP32. If you wish to cast the model to a "
                            "different type, use opt_level='O2' or 'O3'. cast_model_type was {}".format(value))
        elif name == "patch_torch_functions":
            if self.opt_level != "O1" and value:
                warn_or_err("Currently, patch_torch_functions=True should only be set by selecting opt_level='O1'.")
        elif name == "keep_batchnorm_fp32":
            if self.opt_level == "O1" and value is not None:
                warn_or_err("With opt_level O1, batchnorm functions are automatically patched to run in FP32, so "
                            "keep_batchnorm_fp32 should be None. keep_batchnorm_fp32 was {}".format(value))
            if value in ("False", "True"):
                value = value == "True"
            assert value is True or value is False or value is None, \
                "keep_batchnorm_fp32 must be a boolean, the string 'True' or 'False', or None, " \
                "found keep_batchnorm_fp32={}".format(value)
        elif name == "master_weights":
            if self.opt_level == "O1" and value is not None:
                warn_or_err("It doesn't make sense to use master_weights with O1. "
                            "With O1, your model weights themselves should be FP32.")
        elif name == "loss_scale":
            value = value if value == "dynamic" else float(value)
        elif name in ("combine_grad", "check_combined_tensors"):
            if self.opt_level not in ["O1", "O2"] and value:
                warn_or_err("Currently, combine_grad=True or check_combined_tensors=True should only be set "
                            "by selecting opt_level='O1' or opt_level='O2'.")
        elif name == "combine_ddp":
            if not self.combine_grad:
                warn_or_err("Combine_grad should be True when combine_ddp using.. \n")
        elif name == "user_cast_preferred":
            if self.opt_level != "O1" and value:
                warn_or_err("Currently, user_cast_preferred=True should only be set by selecting opt_level='O1'.")
        self.options[name] = value


class _OptLevel(object):
    def __init__(self, name, brief, cast_model_type, patch_torch_functions, keep_batchnorm_fp32, master_weights,
                 loss_scale):
        self.name, self.brief = name, brief
        self.values = (cast_model_type, patch_torch_functions, keep_batchnorm_fp32, master_weights, loss_scale)

    def __call__(self, properties):
        properties.enabled = True
        properties.opt_level = self.name
        (properties.cast_model_type, properties.patch_torch_functions, properties.keep_batchnorm_fp32,
         properties.master_weights, properties.loss_scale) = self.values
        return properties


opt_levels = {
    "O3": _OptLevel("O3", "O3:  Pure FP16 training.", torch.float16, False, False, False, 1.0),
    "O2": _OptLevel("O2", "O2:  FP16 training with FP32 batchnorm and FP32 master weights.\n",
                    torch.float16, False, True, True, "dynamic"),
    "O1": _OptLevel("O1", "O1:  Insert automatic casts around Pytorch functions and Tensor methods.\n",
                    None, True, None, None, "dynamic"),
    "O0": _OptLevel("O0", "O0:  Pure FP32 training.\n", torch.float32, False, None, False, 1.0),
}


def _print_options(header):
    maybe_print(header, True)
    for k, v in _amp_state.opt_properties.options.items():
        maybe_print("{:22} : {}".format(k, v), True)


def initialize(models, optimizers=None, enabled=True, opt_level="O1", cast_model_type=None,
               patch_torch_functions=None, keep_batchnorm_fp32=None, master_weights=None, loss_scale=None,
               cast_model_outputs=None, num_losses=1, verbosity=1, dynamic_init_scale=2.**16,
               scale_growth_factor=2., scale_backoff_factor=0.5, scale_window=2000, min_loss_scale=None,
               max_loss_scale=2.**24, combine_grad=None, combine_ddp=None, ddp_replica_count=4,
               user_cast_preferred=None, check_combined_tensors=None):
    """Stand-in for apex.amp.initialize (Ascend fork signature); see the module docstring."""
    _amp_state.opt_properties = Properties()
    _amp_state.verbosity = verbosity

    if not enabled:
        return models if optimizers is None else (models, optimizers)

    if opt_level not in opt_levels:
        raise RuntimeError("Unexpected optimization level {}. ".format(opt_level) +
                           "Options are 'O0', 'O1', 'O2', 'O3'.  Note that in `O0`, `O1`, etc., the prefix O is "
                           "the letter O, not the number zero.")
    _amp_state.opt_properties = opt_levels[opt_level](_amp_state.opt_properties)
    maybe_print("Selected optimization level {}".format(opt_levels[opt_level].brief), True)
    _print_options("Defaults for this optimization level are:")

    _amp_state.dynamic_init_scale = dynamic_init_scale
    _amp_state.scale_growth_factor = scale_growth_factor
    _amp_state.scale_backoff_factor = scale_backoff_factor
    _amp_state.scale_window = scale_window
    _amp_state.min_loss_scale = min_loss_scale
    _amp_state.max_loss_scale = max_loss_scale

    maybe_print("Processing user overrides (additional kwargs that are not None)...", True)
    props = _amp_state.opt_properties
    for name, value in (("enabled", enabled), ("opt_level", opt_level), ("cast_model_type", cast_model_type),
                        ("patch_torch_functions", patch_torch_functions),
                        ("keep_batchnorm_fp32", keep_batchnorm_fp32), ("master_weights", master_weights),
                        ("loss_scale", loss_scale), ("combine_grad", combine_grad), ("combine_ddp", combine_ddp),
                        ("ddp_replica_count", ddp_replica_count), ("user_cast_preferred", user_cast_preferred),
                        ("check_combined_tensors", check_combined_tensors)):
        if value is not None:
            setattr(props, name, value)
    _print_options("After processing overrides, optimization options are:")

    if props.combine_ddp:
        raise NotImplementedError("apex stand-in: combine_ddp is not modelled")
    return _initialize(models, optimizers, props, num_losses, cast_model_outputs)


def state_dict(destination=None):
    if destination is None:
        destination = OrderedDict()
    for idx, loss_scaler in enumerate(_amp_state.loss_scalers):
        destination["loss_scaler%d" % idx] = {
            "loss_scale": loss_scaler.loss_scale(),
            "unskipped": loss_scaler._unskipped,
        }
    return destination


def load_state_dict(state_dict):
    if len(state_dict) != len(_amp_state.loss_scalers):
        print("Warning: state_dict contains {} entries, while {} loss_scalers are used".format(
            len(state_dict), len(_amp_state.loss_scalers)))
    state_dict = state_dict.copy()
    nb_loss_scalers = len(_amp_state.loss_scalers)
    unexpected_keys = []
    idx = 0
    for key in state_dict:
        if "loss_scaler" not in key:
            unexpected_keys.append(key)
        else:
            if idx > (nb_loss_scalers - 1):
                print("Skipping loss_scaler[{}], since num_losses was set to {}".format(idx, nb_loss_scalers))
                break
            _amp_state.loss_scalers[idx]._loss_scale = state_dict[key]["loss_scale"]
            _amp_state.loss_scalers[idx]._unskipped = state_dict[key]["unskipped"]
            idx += 1
    if len(unexpected_keys) > 0:
        raise RuntimeError("Error(s) in loading state_dict. Unexpected key(s) in state_dict: {}. ".format(
            ", ".join('"{}"'.format(k) for k in unexpected_keys)))
