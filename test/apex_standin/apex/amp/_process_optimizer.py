"""Stand-in for ``apex/amp/_process_optimizer.py`` (NVIDIA apex 4ef930c1 + Ascend npu.patch, Ascend/apex master
49a7994e): how ``amp.initialize`` patches an optimizer.

Observable behaviour kept:
* An optimizer may pass through amp.initialize once ("A given optimizer should only be passed through
  amp.initialize once.").
* Ascend's NPU-fused-optimizer checks, verbatim messages::

      if hasattr(optimizer, "is_npu_fused_optimizer") and optimizer.is_npu_fused_optimizer is True:
          maybe_print("Use npu fused optimizer")
          if properties.opt_level != "O1" and properties.opt_level != "O2":
              raise RuntimeError("Currently, npu fused optimizer can only be used when opt_level='O1' or opt_level='O2'")
      ...
      if properties.combine_grad or optimizer.is_npu_fused_optimizer:
          if properties.opt_level == "O2" and properties.master_weights != True:
              raise RuntimeError("With opt_level O2, master_weights should be True when combine_grad is True or "
                                 "npu fused optimizer is used")

* master_weights (O2): fp32 master copies are made LAZILY (first ``zero_grad()`` or ``amp.scale_loss``), and
  then replace the fp16 params in ``optimizer.param_groups`` (per-param state is moved to the master);
  ``step(closure=None)`` refuses a closure, steps the masters, copies them into the fp16 model params and clears
  the master grads; ``zero_grad`` is replaced by a method taking NO arguments (``zero_grad(set_to_none=True)`` is
  a TypeError) that zeroes the model grads and drops (or, with combine_grad / a fused optimizer, zeroes) the
  master grads.
* no master weights (O0/O1/O3): ``zero_grad`` is replaced by a no-argument method only with combine_grad=True or
  an NPU fused optimizer; otherwise the optimizer's own zero_grad stays.
* Backward bookkeeping: grads accumulated before a scale_loss are stashed and added back after unscaling, so
  gradient accumulation over several scale_loss blocks works as in apex.

Simplified: no combined/fused gradient buffers (``combine_grad`` only changes which zero_grad is installed and
whether master grads are zeroed or dropped), no FusedSGD special cases, no combine_ddp, and params are typed by
dtype (fp16/fp32 on any device) where the real one demands ``torch.npu.HalfTensor``/``torch.npu.FloatTensor``.
"""
import types

import torch

from ._amp_state import maybe_print


class AmpOptimizerState(object):
    pass


def _param_kind(param):
    if param.dtype == torch.float16:
        return "fp16"
    if param.dtype == torch.float32:
        return "fp32"
    raise TypeError("Optimizer's parameters must be either torch.npu.FloatTensor or torch.npu.HalfTensor. "
                    "Received {}".format(param.type()))


def _amp_lazy_init(self):
    stash = self._amp_stash
    if not stash.lazy_init_called:
        self._lazy_init_maybe_master_weights()
        stash.lazy_init_called = True


# -- master weights (O2) ------------------------------------------------------------------------------------

def _split_group_with_master_weights(self, group, stash):
    """Replace fp16 params of GROUP (in place) by fp32 master copies; record the three kinds in STASH."""
    fp16, fp32, masters = [], [], []
    for i, param in enumerate(group["params"]):
        if not param.requires_grad:
            continue
        if _param_kind(param) == "fp16":
            master = param.detach().clone().float()
            master.requires_grad = True
            group["params"][i] = master
            fp16.append(param)
            masters.append(master)
            if param in self.state:  # move per-param state to the master (recast by load_state_dict below)
                self.state[master] = self.state.pop(param)
        else:
            fp32.append(param)
    stash.fp16_groups.append(fp16)
    stash.fp32_from_fp16_groups.append(masters)
    stash.fp32_from_fp32_groups.append(fp32)
    stash.all_fp16_params += fp16
    stash.all_fp32_from_fp16_params += masters
    stash.all_fp32_from_fp32_params += fp32
    stash.all_fp32_from_fp32_grad_stash += [None] * len(fp32)


def lazy_init_with_master_weights(self):
    stash = self._amp_stash
    stash.fp16_groups, stash.fp32_from_fp16_groups, stash.fp32_from_fp32_groups = [], [], []
    stash.all_fp16_params, stash.all_fp32_from_fp16_params, stash.all_fp32_from_fp32_params = [], [], []
    stash.all_fp32_from_fp32_grad_stash = []
    for group in self.param_groups:
        _split_group_with_master_weights(self, group, stash)
    for param in stash.all_fp32_from_fp16_params + stash.all_fp32_from_fp32_params:
        param.grad = None
    self.load_state_dict(self.state_dict())  # recast any per-param state to the masters' dtype


def _master_params_to_model_params(self):
    stash = self._amp_stash
    with torch.no_grad():
        for model, master in zip(stash.all_fp16_params, stash.all_fp32_from_fp16_params):
            model.data.copy_(master.data)


def prepare_backward_with_master_weights(self):
    stash = self._amp_stash
    self._amp_lazy_init()
    for param in stash.all_fp16_params:
        param.grad = None
    for i, param in enumerate(stash.all_fp32_from_fp32_params):
        stash.all_fp32_from_fp32_grad_stash[i] = param.grad
        param.grad = None


def post_backward_with_master_weights(self, scaler):
    stash = self._amp_stash
    self._amp_lazy_init()
    scale = scaler.loss_scale()
    scaler.check_grads_overflow([p.grad for p in stash.all_fp16_params + stash.all_fp32_from_fp32_params])
    with torch.no_grad():
        for model, master in zip(stash.all_fp16_params, stash.all_fp32_from_fp16_params):
            if model.grad is None:
                continue
            fresh = model.grad.float().mul_(1.0 / scale)
            if master.grad is None or stash.process_zero_grad:
                master.grad = fresh
            else:
                master.grad.add_(fresh)
        _unscale_models_are_masters(scale, stash.all_fp32_from_fp32_params, stash.all_fp32_from_fp32_grad_stash,
                                    stashed_are_zero=stash.process_zero_grad)
    stash.process_zero_grad = False


def _clear_master_grads(self):
    for param in self._amp_stash.all_fp32_from_fp16_params:
        if (self.accelerate or self.is_npu_fused_optimizer) and param.grad is not None:
            param.grad.zero_()
        else:
            param.grad = None


def _zero_model_grads(params):
    for param in params:
        if param.grad is not None:
            param.grad.detach_()
            param.grad.zero_()


def new_zero_grad_with_master_weights(self):  # NB: no set_to_none argument, as in apex
    stash = self._amp_stash
    self._amp_lazy_init()
    stash.process_zero_grad = True
    _zero_model_grads(stash.all_fp16_params)
    _zero_model_grads(stash.all_fp32_from_fp32_params)
    _clear_master_grads(self)


# -- no master weights (O0/O1/O3) ---------------------------------------------------------------------------

def lazy_init_no_master_weights(self):
    stash = self._amp_stash
    skip_frozen = self.accelerate or self.is_npu_fused_optimizer
    stash.all_fp16_params, stash.all_fp32_params = [], []
    for group in self.param_groups:
        for param in group["params"]:
            if skip_frozen and not param.requires_grad:
                continue
            (stash.all_fp16_params if _param_kind(param) == "fp16" else stash.all_fp32_params).append(param)
    stash.all_fp16_grad_stash = [None] * len(stash.all_fp16_params)
    stash.all_fp32_grad_stash = [None] * len(stash.all_fp32_params)


def prepare_backward_no_master_weights(self):
    stash = self._amp_stash
    self._amp_lazy_init()
    for params, grad_stash in ((stash.all_fp16_params, stash.all_fp16_grad_stash),
                               (stash.all_fp32_params, stash.all_fp32_grad_stash)):
        for i, param in enumerate(params):
            grad_stash[i] = param.grad
            param.grad = None


def post_backward_no_master_weights(self, scaler):
    stash = self._amp_stash
    self._amp_lazy_init()
    scaler.check_grads_overflow([p.grad for p in stash.all_fp16_params + stash.all_fp32_params])
    with torch.no_grad():
        for params, grad_stash in ((stash.all_fp16_params, stash.all_fp16_grad_stash),
                                   (stash.all_fp32_params, stash.all_fp32_grad_stash)):
            _unscale_models_are_masters(scaler.loss_scale(), params, grad_stash,
                                        stashed_are_zero=stash.process_zero_grad,
                                        skip_if_unit_static=not scaler.dynamic)
    stash.process_zero_grad = False


def _unscale_models_are_masters(scale, params, stashed_grads, stashed_are_zero=False, skip_if_unit_static=False):
    """grad = grad / scale (+ the grad stashed before this backward, unless zero_grad() said it is zero)."""
    for i, param in enumerate(params):
        stashed = stashed_grads[i]
        stashed_grads[i] = None
        if param.grad is None:
            if stashed is not None:
                param.grad = stashed
            continue
        if not (skip_if_unit_static and scale == 1.0):
            param.grad.mul_(1.0 / scale)
        if stashed is not None and not stashed_are_zero:
            param.grad.add_(stashed.to(param.grad.dtype))


# -- the patching -------------------------------------------------------------------------------------------

_PATCHED_NAMES = ("_lazy_init_maybe_master_weights", "_master_params_to_model_params", "_prepare_amp_backward",
                  "_post_amp_backward", "_amp_lazy_init")


def _process_optimizer(optimizer, properties):
    if hasattr(optimizer, "_amp_stash"):
        raise RuntimeError("A given optimizer should only be passed through amp.initialize once.")
    optimizer._amp_stash = stash = AmpOptimizerState()
    stash.lazy_init_called = False
    stash.already_patched = False
    stash.params_have_scaled_gradients = False
    stash.process_zero_grad = True
    stash.master_weights = properties.master_weights
    optimizer.accelerate = properties.combine_grad
    optimizer.check_combined_tensors = properties.check_combined_tensors

    for name in _PATCHED_NAMES:
        if hasattr(optimizer, name):
            raise RuntimeError("Incoming optimizer already has {} defined.".format(name))

    if getattr(optimizer, "is_npu_fused_optimizer", None) is True:
        maybe_print("Use npu fused optimizer")
        if properties.opt_level != "O1" and properties.opt_level != "O2":
            raise RuntimeError("Currently, npu fused optimizer can only be used when opt_level='O1' or opt_level='O2'")
    else:
        optimizer.is_npu_fused_optimizer = False

    if properties.combine_grad or optimizer.is_npu_fused_optimizer:
        if properties.opt_level == "O2" and properties.master_weights is not True:
            raise RuntimeError("With opt_level O2, master_weights should be True when combine_grad is True or "
                               "npu fused optimizer is used")
    elif properties.check_combined_tensors:
        maybe_print("Because combine_grad != True and no npu fused optimizer is used, "
                    "checking combined tensors function will not take effect!")

    bind = lambda fn: types.MethodType(fn, optimizer)  # noqa: E731
    if properties.master_weights:
        optimizer._lazy_init_maybe_master_weights = bind(lazy_init_with_master_weights)
        optimizer._master_params_to_model_params = bind(_master_params_to_model_params)
        old_step = optimizer.step

        def new_step(self, closure=None):
            if closure is not None:
                raise RuntimeError("Currently, Amp does not support closure use with optimizers.")
            retval = old_step()
            self._master_params_to_model_params()
            _clear_master_grads(self)  # the master grads that model.zero_grad() would not clear
            return retval

        optimizer.step = bind(new_step)
        optimizer.zero_grad = bind(new_zero_grad_with_master_weights)
        optimizer._prepare_amp_backward = bind(prepare_backward_with_master_weights)
        optimizer._post_amp_backward = bind(post_backward_with_master_weights)
    else:
        optimizer._lazy_init_maybe_master_weights = bind(lazy_init_no_master_weights)
        if optimizer.accelerate or optimizer.is_npu_fused_optimizer:
            def new_zero_grad_accelerate_no_master_weights(self):  # no set_to_none argument, as in the fork
                stash = self._amp_stash
                self._amp_lazy_init()
                stash.process_zero_grad = True
                _zero_model_grads(stash.all_fp16_params)
                _zero_model_grads(stash.all_fp32_params)

            optimizer.zero_grad = bind(new_zero_grad_accelerate_no_master_weights)
        optimizer._prepare_amp_backward = bind(prepare_backward_no_master_weights)
        optimizer._post_amp_backward = bind(post_backward_no_master_weights)
    optimizer._amp_lazy_init = bind(_amp_lazy_init)

    old_add_param_group = optimizer.add_param_group

    def new_add_param_group(self, new_group):
        stash = self._amp_stash
        self._amp_lazy_init()
        assert isinstance(new_group, dict), "param group must be a dict"
        params = new_group["params"]
        if isinstance(params, torch.Tensor):
            new_group["params"] = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering "
                            "of tensors in sets will change between runs. Please use a list instead.")
        else:
            new_group["params"] = list(params)
        if properties.master_weights:
            _split_group_with_master_weights(self, new_group, stash)
        else:
            for param in new_group["params"]:
                kind = _param_kind(param)
                (stash.all_fp16_params if kind == "fp16" else stash.all_fp32_params).append(param)
                (stash.all_fp16_grad_stash if kind == "fp16" else stash.all_fp32_grad_stash).append(None)
        old_add_param_group(new_group)

    optimizer.add_param_group = bind(new_add_param_group)
    return optimizer
