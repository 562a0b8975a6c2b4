"""Stand-in for ``apex.optimizers`` of Ascend's fork (its ``apex/optimizers/__init__.py`` is rewritten by
npu.patch to export the NpuFused* optimizers). Only ``NpuFusedSGD`` is mirrored."""
from .npu_fused_sgd import NpuFusedSGD

__all__ = ["NpuFusedSGD"]
