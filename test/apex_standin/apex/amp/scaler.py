"""Stand-in for ``apex/amp/scaler.py`` ``LossScaler`` as patched by Ascend (npu.patch, Ascend/apex master 49a7994e).

Observable behaviour kept:
* ``LossScaler(loss_scale, init_scale=2.**16, scale_growth_factor=2., scale_backoff_factor=0.5,
  scale_window=2000, min_loss_scale=None, max_loss_scale=2.**24)``; ``loss_scale == "dynamic"`` starts at
  ``min(max_loss_scale, init_scale)``, anything else is a static scale.
* Overflow is only ever detected with a dynamic scale (the fork's ``check_overflow_and_sync`` sets
  ``_has_overflow = False`` for a static one), so a static scale never skips a step.
* ``update_scale()``: on overflow scale *= backoff (floored at min_loss_scale), ``_unskipped = 0``, returns True
  (skip); otherwise ``_unskipped += 1`` and after ``scale_window`` clean steps scale *= growth (capped at
  max_loss_scale) -- growth only when dynamic, but ``_unskipped`` counts for static scales too, as upstream.

Simplified: overflow = any inf/nan in the scaled model gradients of this backward, checked in Python (the fork
reads the NPU float-status register, or on inf/nan-capable NPUs runs ``_amp_foreach_non_finite_check_and_unscale_``
on the model grads). No distributed all-reduce of the overflow flag.
"""
import torch


class LossScaler(object):
    def __init__(self, loss_scale, init_scale=2.**16, scale_growth_factor=2., scale_backoff_factor=0.5,
                 scale_window=2000, min_loss_scale=None, max_loss_scale=2.**24):
        if loss_scale == "dynamic":
            self.dynamic = True
            self._loss_scale = min(max_loss_scale, init_scale)
        else:
            self.dynamic = False
            self._loss_scale = loss_scale
        self._max_loss_scale = max_loss_scale
        self._min_loss_scale = min_loss_scale
        self._scale_growth_factor = scale_growth_factor
        self._scale_backoff_factor = scale_backoff_factor
        self._scale_seq_len = scale_window
        self._unskipped = 0
        self._has_overflow = False

    def loss_scale(self):
        return self._loss_scale

    def clear_overflow_state(self):
        self._has_overflow = False

    def check_grads_overflow(self, grads):
        """Dynamic scale only: flag an overflow if any of GRADS (scaled, as the backward left them) is non-finite."""
        if not self.dynamic or self._has_overflow:
            return self._has_overflow
        for g in grads:
            if g is not None and not bool(torch.isfinite(g).all()):
                self._has_overflow = True
                break
        return self._has_overflow

    def update_scale(self):
        if self._has_overflow and self.dynamic:
            should_skip = True
            new_scale = self._loss_scale * self._scale_backoff_factor
            self._loss_scale = max(self._min_loss_scale, new_scale) if self._min_loss_scale else new_scale
            self._unskipped = 0
        else:
            should_skip = False
            self._unskipped += 1
        if self._unskipped == self._scale_seq_len and self.dynamic:
            self._loss_scale = min(self._max_loss_scale, self._loss_scale * self._scale_growth_factor)
            self._unskipped = 0
        return should_skip
