"""TEST-ONLY stand-in for Ascend's fork of apex (gitee.com/ascend/apex, GitHub mirror Ascend/apex).

Never install this and never ship it as ``apex``: tests put ``test/apex_standin`` on ``sys.path`` (or
PYTHONPATH) when they want our apex code path to run end to end on a CPU.

Mirrors the public surface our training code uses:

* ``apex.amp``: ``initialize``, ``scale_loss``, ``master_params``, ``state_dict``, ``load_state_dict``.
  The real code is NVIDIA apex ``apex/amp/{frontend,_initialize,_process_optimizer,handle,scaler,_amp_state}.py``
  at NVIDIA/apex commit 4ef930c1c884fdca5f472ab2ce7cb9b505d26c1a (the commit Ascend's scripts/build.sh checks
  out) with Ascend's ``patch/npu.patch`` applied (Ascend/apex branch master, commit
  49a7994e13cc70d155adbd7b25b7a6b86e38e58e, 2023-11-23).
* ``apex.optimizers.NpuFusedSGD``: Ascend's ``src/apex/optimizers/npu_fused_sgd.py`` (same commit).

What it simplifies is listed in each module's docstring. In short: plain per-tensor Python instead of fused /
combined ("combine_grad") buffers, no NPU float-status register (overflow = any non-finite gradient, which is
what the fork does on NPUs that support inf/nan mode), O1 does not patch torch functions (the model computes in
fp32), and no device checks (CPU tensors are accepted where the real one wants ``torch.npu.*Tensor``).
"""
from . import amp, optimizers  # noqa: F401

__standin__ = True  # lets a test assert it is talking to the stand-in, never to a real apex
__all__ = ["amp", "optimizers"]
