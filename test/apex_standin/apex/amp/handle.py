"""Stand-in for ``apex/amp/handle.py`` ``scale_loss`` (NVIDIA apex 4ef930c1 + Ascend npu.patch, Ascend/apex master
49a7994e).

Real signature (unchanged by the fork)::

    @contextlib.contextmanager
    def scale_loss(loss, optimizers, loss_id=0, model=None, delay_unscale=False, delay_overflow_check=False)

Observable behaviour kept:
* RuntimeError if amp.initialize was never called; with enabled=False it yields ``loss`` untouched.
* No master weights and a static scale of 1.0 (O0, O3 by default): yields ``loss.float()`` and does nothing else.
* Otherwise yields ``loss.float() * loss_scale``; on exit (unless delay_unscale) copies fp16 model grads into fp32
  master grads / unscales in place, detects overflow (dynamic scale only), calls ``update_scale()`` (unless
  delay_overflow_check) and, on overflow, replaces ``optimizer.step`` ONCE by a skip that prints
  "Gradient overflow.  Skipping step, loss scaler 0 reducing loss scale to ...", clears the master grads and
  restores the real step.

Simplified: no NPU float-status clear/read around the backward (see scaler.py), no O1 cast-cache clearing
(the stand-in's O1 does not patch torch functions).
"""
import contextlib

import torch

from ._amp_state import _amp_state, maybe_print


@contextlib.contextmanager
def scale_loss(loss, optimizers, loss_id=0, model=None, delay_unscale=False, delay_overflow_check=False):
    if not hasattr(_amp_state, "opt_properties"):
        raise RuntimeError("Invoked 'with amp.scale_loss`, but internal Amp state has not been initialized.  "
                           "model, optimizer = amp.initialize(model, optimizer, opt_level=...) must be called "
                           "before `with amp.scale_loss`.")
    if not _amp_state.opt_properties.enabled:
        yield loss
        return

    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]

    loss_scaler = _amp_state.loss_scalers[loss_id]
    loss_scale = loss_scaler.loss_scale()

    if (not _amp_state.opt_properties.master_weights) and (not loss_scaler.dynamic) and loss_scale == 1.0:
        yield loss.float()
        return

    if not delay_unscale:
        for optimizer in optimizers:
            if not optimizer._amp_stash.params_have_scaled_gradients:
                optimizer._prepare_amp_backward()

    yield loss.float() * loss_scale

    if delay_unscale:
        for optimizer in optimizers:
            optimizer._amp_stash.params_have_scaled_gradients = True
        return

    loss_scaler.clear_overflow_state()
    for optimizer in optimizers:
        optimizer._post_amp_backward(loss_scaler)
        optimizer._amp_stash.params_have_scaled_gradients = False
    should_skip = False if delay_overflow_check else loss_scaler.update_scale()
    if should_skip:
        for optimizer in optimizers:
            if not optimizer._amp_stash.already_patched:
                optimizer.step = _make_skip_step(optimizer, loss_scaler, loss_id)
                optimizer._amp_stash.already_patched = True


def _make_skip_step(opt, loss_scaler, loss_id):
    opt_step = opt.step

    def skip_step(closure=None):
        if closure is not None:
            raise RuntimeError("Currently, Amp does not support closure use with optimizers.")
        maybe_print(("Gradient overflow.  Skipping step, loss scaler "
                     "{} reducing loss scale to {}").format(loss_id, loss_scaler.loss_scale()))
        if hasattr(opt._amp_stash, "all_fp32_from_fp16_params"):
            # Clear the master grads that wouldn't be zeroed by model.zero_grad()
            for param in opt._amp_stash.all_fp32_from_fp16_params:
                if (opt.accelerate or opt.is_npu_fused_optimizer) and param.grad is not None:
                    param.grad.zero_()
                else:
                    param.grad = None
        opt.step = opt_step
        opt._amp_stash.already_patched = False

    return skip_step
