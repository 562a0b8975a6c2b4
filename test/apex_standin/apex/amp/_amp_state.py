"""Stand-in for ``apex/amp/_amp_state.py`` (NVIDIA apex 4ef930c1, unchanged in substance by Ascend's npu.patch
except the container_abcs import).

Holds the process-global amp state (``_amp_state``: opt_properties, loss_scalers, verbosity, ...),
``warn_or_err`` (a RuntimeError unless hard_override), ``maybe_print`` (prints when verbosity > 0) and
``master_params``. Simplification: ``maybe_print`` ignores the rank0 argument's distributed filtering
unless torch.distributed is initialised, as the real one does.
"""
import torch


class AmpState(object):
    def __init__(self):
        self.hard_override = False
        self.allow_incoming_model_not_fp32 = False
        self.verbosity = 1


_amp_state = AmpState()


def warn_or_err(msg):
    if _amp_state.hard_override:
        print("Warning:  " + msg)
    else:
        raise RuntimeError(msg)


def maybe_print(msg, rank0=False):
    if _amp_state.verbosity <= 0:
        return
    distributed = (torch.distributed.is_available() and torch.distributed.is_initialized()
                   and torch.distributed.get_world_size() > 1)
    if rank0 and distributed and torch.distributed.get_rank() != 0:
        return
    print(msg)


def master_params(optimizer):
    """Generator over the params owned by ``optimizer`` (after amp.initialize: the fp32 master params once
    the optimizer's lazy init has run, i.e. after its first zero_grad() or amp.scale_loss)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            yield p
