"""Stand-in for ``apex/amp/_initialize.py`` ``_initialize`` (NVIDIA apex 4ef930c1 + Ascend npu.patch, Ascend/apex
master 49a7994e) and ``apex/fp16_utils/fp16util.py`` ``convert_network``.

Observable behaviour kept:
* Returns what it was given: a model alone when optimizers is None, (model, optimizer), or lists.
* Refuses DataParallel/DistributedDataParallel models ("Parallel wrappers should only be applied ... AFTER") and
  models already in fp16 ("you do not need to call .half() on your model").
* cast_model_type (O0: fp32, O2/O3: fp16): with keep_batchnorm_fp32 (O2) every module is cast EXCEPT affine
  ``_BatchNorm`` layers, whose params and running stats stay fp32; otherwise ``model.to(dtype)`` (O3). The
  instance's ``forward`` is replaced by one that casts floating-point inputs to cast_model_type and outputs to
  fp32 (or cast_model_outputs); ``model.state_dict()`` returns fp32 tensors (O2StateDictHook).
* patch_torch_functions (O1): ``optimizer.step`` is wrapped (it passes ``*args, **kwargs`` through).
* Ascend: with combine_grad=True or an NPU fused optimizer, ``torch.nn.Module.zero_grad`` is replaced GLOBALLY by
  ``zero_grad(self, set_to_none=False)`` that asserts ``set_to_none is False`` ("For combined grad,
  `set_to_none` must be False.") and zeroes grads. ``apex.amp._standin_reset()`` undoes it (tests only).

Simplified: O1 does NOT patch torch functions -- the stand-in's O1 model computes in fp32 (no fp16 casts, no
autocast); only the loss scaling and optimizer patching of O1 are modelled. No "input tensor was not npu" warning
and no npu/cuda device checks, no cudnn check, no combine_ddp broadcast.
"""
import functools
import warnings
from collections import abc as container_abcs
from types import MethodType

import numpy as np
import torch

from ._amp_state import _amp_state, maybe_print, warn_or_err
from ._process_optimizer import _process_optimizer
from .scaler import LossScaler

ORIGINAL_MODULE_ZERO_GRAD = torch.nn.Module.zero_grad


def npu_module_zero_grad(self, set_to_none: bool = False) -> None:
    """The fork's replacement for torch.nn.Module.zero_grad under combine_grad / NPU fused optimizers."""
    assert set_to_none is False, "For combined grad, `set_to_none` must be False."
    if getattr(self, "_is_replica", False):
        warnings.warn("Calling .zero_grad() from a module created with nn.DataParallel() has no effect.")
    for p in self.parameters():
        if p.grad is not None:
            if p.grad.grad_fn is not None:
                p.grad.detach_()
            else:
                p.grad.requires_grad_(False)
            p.grad.zero_()


def to_type(dtype, t):
    if isinstance(t, torch.Tensor):
        return t.to(dtype) if t.is_floating_point() else t
    return t.to(dtype)  # custom batch types: trust their .to()


def applier(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (str, np.ndarray)):
        return value
    if hasattr(value, "to"):
        return fn(value)
    if isinstance(value, container_abcs.Mapping):
        return {applier(k, fn): applier(v, fn) for k, v in value.items()}
    if isinstance(value, container_abcs.Iterable):
        return type(value)(applier(v, fn) for v in value)
    return value


def check_models(models):
    for model in models:
        parallel_type = None
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            parallel_type = "torch.nn.parallel.DistributedDataParallel"
        if isinstance(model, torch.nn.parallel.DataParallel):
            parallel_type = "torch.nn.parallel.DataParallel"
        if parallel_type is not None:
            raise RuntimeError("Incoming model is an instance of {}. ".format(parallel_type) +
                               "Parallel wrappers should only be applied to the model(s) AFTER \n"
                               "the model(s) have been returned from amp.initialize.")


def check_params_fp32(models):
    for model in models:
        for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, t in named:
                if t.is_floating_point() and t.dtype == torch.float16:
                    warn_or_err("Found {} {} with type {}, expected torch.npu.FloatTensor.\n"
                                       "When using amp.initialize, you do not need to call .half() on your model\n"
                                       "before passing it, no matter what optimization level you choose."
                                       .format(kind, name, t.type()))


def convert_network(network, dtype):
    """Cast every module's own params/buffers to DTYPE, except affine BatchNorm layers (apex.fp16_utils)."""
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.affine is True:
            continue
        for param in module.parameters(recurse=False):
            if param.data.dtype.is_floating_point:
                param.data = param.data.to(dtype=dtype)
            if param._grad is not None and param._grad.data.dtype.is_floating_point:
                param._grad.data = param._grad.data.to(dtype=dtype)
        for buf in module.buffers(recurse=False):
            if buf.data.dtype.is_floating_point:
                buf.data = buf.data.to(dtype=dtype)
    return network


class O2StateDictHook(object):
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, module, state_dict, prefix, local_metadata):
        for key in state_dict:
            value = state_dict[key]
            if isinstance(value, torch.Tensor) and value.dtype == torch.float16:
                state_dict[key] = value.to(torch.float32)


def _patch_forward(model, input_caster, output_caster):
    old_fwd = model.forward

    def new_fwd(*args, **kwargs):
        if input_caster is not None:
            args, kwargs = applier(args, input_caster), applier(kwargs, input_caster)
        return applier(old_fwd(*args, **kwargs), output_caster)

    model.forward = new_fwd


def _initialize(models, optimizers, properties, num_losses=1, cast_model_outputs=None):
    optimizers_was_list = False
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    elif optimizers is None:
        optimizers = []
    elif isinstance(optimizers, list):
        optimizers_was_list = True
    else:
        raise TypeError("optimizers must be either a single optimizer or a list of optimizers.")

    if isinstance(models, torch.nn.Module):
        models_was_list = False
        models = [models]
    elif isinstance(models, list):
        models_was_list = True
    else:
        raise TypeError("models must be either a single model or a list of models.")

    check_models(models)
    if not _amp_state.allow_incoming_model_not_fp32:
        check_params_fp32(models)

    if properties.cast_model_type:
        for model in models:
            if properties.keep_batchnorm_fp32:
                convert_network(model, properties.cast_model_type)
            else:
                model.to(properties.cast_model_type)
        input_caster = functools.partial(to_type, properties.cast_model_type)
        output_caster = functools.partial(to_type, cast_model_outputs or torch.float32)
        for model in models:
            _patch_forward(model, input_caster, output_caster)
        for optimizer in optimizers:  # recast preexisting per-param state
            optimizer.load_state_dict(optimizer.state_dict())
        for model in models:
            for module in model.modules():
                module._register_state_dict_hook(O2StateDictHook(functools.partial(to_type, torch.float32)))
    elif cast_model_outputs is not None:
        for model in models:
            _patch_forward(model, None, functools.partial(to_type, cast_model_outputs))

    for i, optimizer in enumerate(optimizers):
        optimizers[i] = _process_optimizer(optimizer, properties)

    _amp_state.loss_scalers = [
        LossScaler(properties.loss_scale, init_scale=_amp_state.dynamic_init_scale,
                   scale_growth_factor=_amp_state.scale_growth_factor,
                   scale_backoff_factor=_amp_state.scale_backoff_factor, scale_window=_amp_state.scale_window,
                   min_loss_scale=_amp_state.min_loss_scale, max_loss_scale=_amp_state.max_loss_scale)
        for _ in range(num_losses)]

    if properties.patch_torch_functions:
        # Real O1: amp_init() patches torch functions to cast to fp16, and each optimizer.step runs with casts
        # disabled. The stand-in keeps fp32 compute and only keeps the step wrapper's signature.
        for optimizer in optimizers:
            def patch_step(old_step):
                def new_step(self, *args, **kwargs):
                    return old_step(*args, **kwargs)
                return new_step
            optimizer.step = MethodType(patch_step(optimizer.step), optimizer)

    if properties.combine_grad or any(getattr(o, "is_npu_fused_optimizer", False) for o in optimizers):
        torch.nn.Module.zero_grad = npu_module_zero_grad
        maybe_print("Warning: Default value of `set_to_none` in torch.nn.Module.zero_grad() is set as False for "
                    "combine grad, which is True since torch 2.0.")

    if optimizers_was_list:
        return (models if models_was_list else models[0]), optimizers
    if len(optimizers) == 0:
        return models if models_was_list else models[0]
    return (models if models_was_list else models[0]), optimizers[0]
