"""Stand-in for Ascend's ``src/apex/optimizers/npu_fused_sgd.py`` (Ascend/apex master 49a7994e).

Real signature::

    class NpuFusedSGD(Optimizer):
        def __init__(self, params, lr=required, momentum=MOMENTUM_MIN, dampening=DAMPENING_DEFAULT,
                     weight_decay=WEIGHT_DECAY_MIN, nesterov=False)   # MOMENTUM_MIN = DAMPENING_DEFAULT = 0.0 ...

Observable behaviour kept:
* the same argument validation and messages ("Invalid learning rate: ...", "Invalid momentum value: ...",
  "Invalid weight_decay value: ...", "Nesterov momentum requires a momentum and zero dampening");
* ``is_npu_fused_optimizer = True``, which is what amp.initialize keys on: only opt levels O1/O2 accept it
  ("Currently, npu fused optimizer can only be used when opt_level='O1' or opt_level='O2'", RuntimeError
  raised by amp's _process_optimizer) and O2 requires master_weights=True;
* ``step()`` without amp raises RuntimeError('apex.optimizers.NpuFusedSGD should be used with AMP.');
* the update is torch.optim.SGD's (momentum buffer initialised to the first (decayed) gradient, then
  ``buf = momentum*buf + (1-dampening)*g``; Nesterov ``g + momentum*buf``), state key 'momentum_buffer'.

Simplified: per-tensor Python loop instead of updates on combined (fused) NPU buffers.
"""
import torch
from torch.optim.optimizer import Optimizer, required

LR_MIN = 0.0
MOMENTUM_MIN = 0.0
DAMPENING_DEFAULT = 0.0
WEIGHT_DECAY_MIN = 0.0


class NpuFusedSGD(Optimizer):
    def __init__(self, params, lr=required, momentum=MOMENTUM_MIN, dampening=DAMPENING_DEFAULT,
                 weight_decay=WEIGHT_DECAY_MIN, nesterov=False):
        if lr is not required and lr < LR_MIN:
            raise ValueError("Invalid learning rate: {}".format(lr))
        if momentum < MOMENTUM_MIN:
            raise ValueError("Invalid momentum value: {}".format(momentum))
        if weight_decay < WEIGHT_DECAY_MIN:
            raise ValueError("Invalid weight_decay value: {}".format(weight_decay))
        if nesterov and (momentum <= MOMENTUM_MIN or dampening != DAMPENING_DEFAULT):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov)
        self.is_npu_fused_optimizer = True
        super(NpuFusedSGD, self).__init__(params, defaults)

    def __setstate__(self, state):
        super(NpuFusedSGD, self).__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)

    @torch.no_grad()
    def step(self, closure=None):
        if not hasattr(self, "_amp_stash"):
            raise RuntimeError("apex.optimizers.NpuFusedSGD should be used with AMP.")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            weight_decay, momentum = group["weight_decay"], group["momentum"]
            dampening, nesterov = group["dampening"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if weight_decay != 0:
                    d_p = d_p.add(p, alpha=weight_decay)
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(d_p).detach()
                    else:
                        buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
                    d_p = d_p.add(buf, alpha=momentum) if nesterov else buf
                p.add_(d_p, alpha=-group["lr"])
        return loss
