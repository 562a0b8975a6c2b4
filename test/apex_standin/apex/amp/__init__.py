"""Stand-in for ``apex.amp`` (NVIDIA apex ``apex/amp/__init__.py`` at 4ef930c1 + Ascend npu.patch, Ascend/apex
master 49a7994e): exports ``initialize``, ``scale_loss``, ``master_params``, ``state_dict``, ``load_state_dict``.

Not mirrored: the legacy ``amp.init``/``AmpHandle`` API, ``register_half_function`` & co (O1 casting
registries), ``disable_casts``. Added for tests only: ``_standin_reset()`` -- forget the global amp state and
restore ``torch.nn.Module.zero_grad`` (which initialize replaces process-wide under combine_grad / NPU fused
optimizers, as the real fork does).
"""
import torch

from ._amp_state import _amp_state, master_params
from ._initialize import ORIGINAL_MODULE_ZERO_GRAD
from .frontend import initialize, load_state_dict, state_dict
from .handle import scale_loss

__all__ = ["initialize", "scale_loss", "master_params", "state_dict", "load_state_dict"]


def _standin_reset():
    """Tests only: undo what amp.initialize did to process-global state."""
    torch.nn.Module.zero_grad = ORIGINAL_MODULE_ZERO_GRAD
    for name in ("opt_properties", "loss_scalers"):
        if hasattr(_amp_state, name):
            delattr(_amp_state, name)
    _amp_state.verbosity = 1
