"""The one place that knows about Ascend NPU, NVIDIA GPU and CPU.

Everything device-specific lives here -- which device to run on, which
distributed backend it speaks, which mixed-precision dtype it is good at, how
losses are scaled (apex on Ascend, torch.amp elsewhere) and which SGD kernel is
fastest -- so that the training loop in main.py reads the same on every device.

We lean on PyTorch's device-generic APIs (torch.accelerator, torch.amp,
torch.get_device_module): once `torch_npu` is imported, "npu" is an accelerator
like "cuda" and the same calls drive both.
"""
import contextlib
import importlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from cli import UserError


class DeviceError(UserError):
    """A requested device or optional package is not available (one-line message, exit code 2)."""


DEVICE_TYPES = ("auto", "npu", "cuda", "cpu")
DIST_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


def _import_torch_npu():
    """Import torch_npu if it is installed; importing it registers the "npu" device."""
    try:
        importlib.import_module("torch_npu")
        return True
    except Exception:  # ImportError, or CANN libraries missing / broken
        return False


def _npu_available():
    return _import_torch_npu() and torch.npu.is_available() and torch.npu.device_count() > 0


@dataclass(frozen=True)
class Device:
    """The device this process trains on, plus the facts the trainer needs about it."""

    type: str  # "npu" | "cuda" | "cpu"
    index: int = 0

    @property
    def torch_device(self):
        return torch.device(self.type) if self.type == "cpu" else torch.device(self.type, self.index)

    @property
    def is_accelerator(self):
        return self.type != "cpu"

    @property
    def dist_backend(self):
        return DIST_BACKENDS[self.type]

    def module(self):
        """torch.cuda / torch.npu / torch.cpu: the per-device API namespace."""
        return torch.get_device_module(self.type)

    def synchronize(self):
        """Wait for queued kernels so that wall-clock timings mean something."""
        if self.is_accelerator:
            self.module().synchronize(self.index)

    @property
    def channels_last_default(self):
        """NHWC is faster for convolutions with cuDNN and oneDNN; Ascend's kernels prefer their own formats."""
        return self.type in ("cuda", "cpu")

    def supports_bf16(self):
        """bf16 in hardware, not emulated: what --amp picks by default (and what it falls back from)."""
        if self.type == "cpu":
            # Cooper Lake / Sapphire Rapids and newer x86 (AVX512-BF16 / AMX) run bf16 natively in oneDNN.
            return bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)()) and _cpu_has_fast_bf16()
        if self.type == "cuda":
            # Emulated bf16 on pre-Ampere GPUs (V100, T4) counts as "supported" by default: not for us.
            return torch.cuda.is_bf16_supported(including_emulation=False)
        return False  # Ascend 910's fast path is fp16; bf16 there is opt-in via --amp-dtype

    def default_amp_dtype(self):
        """--amp's dtype when --amp-dtype is auto; float32 means --amp does nothing on this device."""
        if self.type == "npu":
            return torch.float16
        if self.type == "cpu":
            # oneDNN's fp16 backward is far slower than bf16 (densenet121: 0.45 vs 25.7 img/s), and on a CPU
            # without native bf16 the emulated bf16 step is slower than fp32 (measured: see README), so fp32.
            return torch.bfloat16 if self.supports_bf16() else torch.float32
        return torch.bfloat16 if self.supports_bf16() else torch.float16

    def describe(self):
        if self.type == "cpu":
            threads = torch.get_num_threads()
            return f"cpu ({threads} thread{'s' if threads > 1 else ''})"
        name = self.module().get_device_name(self.index)
        return f"{self.type}:{self.index} ({name})"


# oneDNN ISA levels (ONEDNN_MAX_CPU_ISA) below which bf16 runs emulated, whatever the processor has.
_ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def _cpu_has_fast_bf16():
    """AVX512-BF16 or AMX in /proc/cpuinfo, unless ONEDNN_MAX_CPU_ISA caps oneDNN below them."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper() in \
            _ONEDNN_ISAS_WITHOUT_BF16:
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def resolve_device(requested="auto", local_rank=0, device_ids=None):
    """Pick the device for this process and bind it.

    `device_ids` maps local ranks onto physical devices (the reference's
    --device_ids "0,1,2,..."); without it local rank r uses visible device
    r modulo the number visible (torchvision's rule): device r when every
    rank sees all the node's devices (torchrun, srun --gpus-per-node), and
    a task's own device when the launcher shows each task only its own (srun
    --gpus-per-task=1 sets a CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES
    of one device per task: local rank 3 then uses device 0 of 1).
    """
    if requested not in DEVICE_TYPES:
        raise DeviceError(f"unknown --device {requested!r}; choose from {', '.join(DEVICE_TYPES)}")
    if requested == "auto":
        if _npu_available():
            requested = "npu"
        elif torch.cuda.is_available():
            requested = "cuda"
        else:
            requested = "cpu"
    elif requested == "npu":
        if not _import_torch_npu():
            raise DeviceError("--device npu needs torch_npu and Huawei's CANN toolkit: install CANN, then "
                              "`pip install torch_npu` matching your torch version, and `source test/env_npu.sh`")
        if not torch.npu.is_available() or torch.npu.device_count() == 0:
            raise DeviceError("--device npu: torch_npu imports but no NPU is visible (check the driver, "
                              "ASCEND_VISIBLE_DEVICES and `npu-smi info`)")
    elif requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA GPU is visible (check `nvidia-smi`, CUDA_VISIBLE_DEVICES, "
                          "and that torch is a CUDA build); use --device cpu to run on the CPU")

    if requested == "cpu":
        return Device("cpu", 0)
    count = torch.get_device_module(requested).device_count()
    if device_ids and local_rank >= len(device_ids):
        raise DeviceError(f"--device_ids {','.join(map(str, device_ids))} names {len(device_ids)} device(s) but "
                          f"this node runs local rank {local_rank}: give one device per local rank")
    if count == 0:
        raise DeviceError(f"--device {requested}: no {requested} device is visible to this process (check "
                          f"CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES and the launcher's device options)")
    index = device_ids[local_rank] if device_ids else local_rank % count
    if index >= count:
        raise DeviceError(f"local rank {local_rank} wants {requested}:{index} but only {count} "
                          f"{requested} device(s) are visible")
    torch.accelerator.set_device_index(index) if hasattr(torch, "accelerator") else \
        torch.get_device_module(requested).set_device(index)
    return Device(requested, index)


def parse_device_ids(text):
    """--device_ids "4,5,6,7" -> [4, 5, 6, 7]; None when not given."""
    if not text:
        return None
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--device_ids must be comma-separated integers, got {text!r}") from None


def configure_backends(device, deterministic=False):
    """Kernel selection for the run: reproducible (--deterministic) or fastest."""
    if deterministic:
        if device.type == "cuda":
            # cuBLAS is reproducible only with a fixed workspace; without it deterministic mode raises at the
            # first matmul. It must be set before cuBLAS starts, which is after this (no kernel has run yet).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN time its algorithms once
    if device.type == "npu" and hasattr(torch.npu, "set_compile_mode"):
        # Ascend ModelZoo's setting: precompiled binary kernels instead of compiling operators online
        # (torch_npu's set_compile_mode; see the ModelZoo-PyTorch training scripts).
        torch.npu.set_compile_mode(jit_compile=False)


def set_threads_per_rank(device, cpus):
    """At most `cpus` threads (this rank's share of the machine: launch.default_workers): ranks on one machine
    share its cores, and oversubscribed OpenMP threads slow CPU training many-fold. OMP_NUM_THREADS wins."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and cpus < torch.get_num_threads():
        torch.set_num_threads(max(1, cpus))


def prepare_collectives(backend):
    """Before the process group: NCCL's watchdog, on a collective that fails or hangs past --dist-timeout (a lost
    peer), by default (TORCH_NCCL_ASYNC_ERROR_HANDLING=3) ends the process at once, from its own thread. 2
    aborts the communicator instead and the waiting call raises, so the trainer stops with one line (stop.py).
    HCCL's torch_npu counterpart (HCCL_ASYNC_ERROR_HANDLING) already defaults to raising. A value the user set
    is kept."""
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")


def abort_collectives(device):
    """After a lost peer on NCCL/HCCL: abort every communicator, so that nothing (a later collective, the copy of
    a tensor to the host) waits on a collective that will never complete. gloo needs nothing: its collectives
    fail at once when a peer's connection closes. True when the device's collectives were aborted."""
    if not device.is_accelerator or not (dist.is_available() and dist.is_initialized()):
        return False
    try:
        dist.distributed_c10d._abort_process_group()  # (torch's experimental API; NCCL, and HCCL through torch_npu)
    except Exception:
        pass  # already torn down by the backend's own error handling
    return True


def check_sync_bn(device):
    if device.type == "cpu":
        raise DeviceError("--sync-bn: torch's SyncBatchNorm runs on GPU/NPU only, not on CPU; drop --sync-bn")


def place_model(model, device, channels_last=False, sync_bn=False):
    """The model on its device, in its memory format, with SyncBatchNorm if asked (before DDP and apex)."""
    model.to(device.torch_device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrap_ddp(model, device):
    """DDP; its constructor broadcasts rank 0's parameters and buffers, so every rank starts from rank 0's."""
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.is_accelerator else None)


@torch.no_grad()
def average_running_stats(modules):
    """Make the BatchNorm running statistics of `modules` the same on every rank: their mean over the ranks.

    DDP broadcasts rank 0's buffers before each forward, then each rank updates them with its own batch, so
    after training every rank holds different ones. Averaging them (as timm's distribute_bn does) lets every
    rank evaluate, and rank 0 save, the same model. All-reduces on the default process group, so on the
    device's own backend (gloo, NCCL, HCCL); num_batches_tracked is the same everywhere and stays. No-op
    outside a distributed run.

    One all-reduce per module: a collective sums an element in an order that depends on its position in the
    buffer, so the EMA's statistics, when they equal the model's, must sit where the model's do to stay equal."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for module in modules:
        stats = [b for name, b in module.named_buffers() if name.endswith(("running_mean", "running_var"))]
        for dtype in sorted({b.dtype for b in stats}, key=str):  # fp32 in practice; one flat buffer per dtype
            same = [b for b in stats if b.dtype == dtype]
            flat = torch.cat([b.reshape(-1) for b in same])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for b, mean in zip(same, flat.split([b.numel() for b in same])):
                b.copy_(mean.view_as(b))


# ----------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------

def _import_apex_amp():
    try:
        from apex import amp  # NVIDIA's or Ascend's apex, built from source; never PyPI's "apex"
        return amp
    except Exception:
        return None


AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# The Ascend original's defaults for --apex-opt-level and --loss_scale_value (its train.py), kept for drop-in use.
DEFAULT_OPT_LEVEL = "O1"
DEFAULT_LOSS_SCALE = 1024.0
# A static scale's GradScaler grows after this many clean steps: never (the int32 growth tracker's maximum).
STATIC_GROWTH_INTERVAL = 2 ** 31 - 1
APEX_FUSED_SGD_OPT_LEVELS = ("O1", "O2")  # Ascend's NpuFusedSGD refuses the others


def parse_loss_scale(value):
    """--loss_scale_value: a number (static scale) or 'dynamic'; None means the default."""
    if value is None or str(value).lower() == "dynamic":
        return "dynamic" if value is not None else None
    try:
        scale = float(value)
    except ValueError:
        raise DeviceError(f"--loss_scale_value must be a number or 'dynamic', got {value!r}")
    if not (scale > 0 and math.isfinite(scale)):
        raise DeviceError(f"--loss_scale_value must be a positive finite number or 'dynamic', got {value}")
    return scale


class MixedPrecision:
    """Autocast + loss scaling + the optimizer step for one run, whatever the backend.

    Modes (backend, dtype):
      * off           -- plain fp32 (--amp not given, --apex-opt-level O0, or a CPU without native bf16)
      * native bf16   -- torch.autocast(bf16); bf16 has fp32's range, so no scaler
      * native fp16   -- torch.autocast(fp16) + torch.amp.GradScaler, static or dynamic scale
      * apex          -- apex.amp.initialize(opt_level, loss_scale); Ascend's fork adds combine_grad
    The training step calls zero_grad, autocast and backward_and_step and never asks which mode it is in.
    """

    def __init__(self, *, device, backend="off", dtype=torch.float32, loss_scale=None, opt_level="O1",
                 growth_interval=2000, notes=()):
        self.device = device
        self.backend = backend if backend == "apex" or dtype != torch.float32 else "off"
        self.dtype = dtype if self.backend != "off" else torch.float32
        self.opt_level = opt_level
        self.loss_scale = float(loss_scale) if isinstance(loss_scale, (int, float)) else loss_scale
        self.static_scale = isinstance(self.loss_scale, float)
        self.growth_interval = growth_interval
        self.notes = list(notes)  # what became of the flags on this device, for the log
        self.apex_amp = None
        self.scaler = None
        # Steps whose gradients overflowed and were skipped; a device tensor so that counting costs no sync.
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device.torch_device)
        if self.backend == "native" and self.dtype == torch.float16:
            # GradScaler's defaults (x2 after growth_interval clean steps, x0.5 on overflow). It refuses a growth
            # factor of 1, so a static scale never grows by a growth interval that is never reached, and is put
            # back after the x0.5 of an overflow (see backward_and_step); overflowing steps are still skipped.
            self.scaler = torch.amp.GradScaler(device.type, init_scale=self.loss_scale if self.static_scale
                                               else 2.0 ** 16,
                                               growth_interval=STATIC_GROWTH_INTERVAL if self.static_scale
                                               else growth_interval)
            self._one = torch.ones((), device=device.torch_device)  # scaler.scale(one): the scale, on the device

    @property
    def npu_fused(self):
        """Ascend's fused path: apex on an NPU at an opt level where its amp takes combine_grad and NpuFusedSGD."""
        return self.backend == "apex" and self.device.type == "npu" and self.opt_level in APEX_FUSED_SGD_OPT_LEVELS

    # -- set-up --------------------------------------------------------------
    def initialize(self, model, optimizer):
        """Hook the backend into model and optimizer (only apex needs to wrap them)."""
        if self.backend != "apex":
            return model, optimizer
        self.apex_amp = _import_apex_amp()
        kwargs = dict(opt_level=self.opt_level,
                      loss_scale=self.loss_scale if isinstance(self.loss_scale, float) else "dynamic")
        if self.npu_fused:
            # Ascend fork: fuse gradient buffers for fewer kernel launches (its amp refuses it at O0/O3).
            kwargs["combine_grad"] = True
        return self.apex_amp.initialize(model, optimizer, **kwargs)

    def describe(self):
        """One line for the log: the precision in force, then what the flags meant on this device."""
        if self.backend == "off":
            text = "fp32 (no mixed precision)"
        elif self.backend == "apex":
            text = f"apex amp opt_level={self.opt_level}, " + (f"loss scale {self.loss_scale:g}" if self.static_scale
                                                                 else "dynamic loss scale")
        else:
            dtype = "bf16" if self.dtype == torch.bfloat16 else "fp16"
            text = f"native torch.autocast({self.device.type}, {dtype})"
            if self.scaler is None:
                text += ", no loss scaling (bf16 has fp32's exponent range)"
            elif self.static_scale:
                text += f", static loss scale {self.loss_scale:g} (overflowing steps skipped)"
            else:
                text += ", dynamic loss scale"
        return "; ".join([text, *self.notes])

    # -- per step ------------------------------------------------------------
    def autocast(self):
        if self.backend == "native":
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()  # fp32, or apex (which patched the model itself)

    def zero_grad(self, optimizer):
        if self.backend == "apex":
            # apex O2 (NVIDIA's and Ascend's fork) replaces optimizer.zero_grad with a method taking no
            # arguments (it also clears the fp32 master gradients); set_to_none= would be a TypeError.
            optimizer.zero_grad()
        else:
            optimizer.zero_grad(set_to_none=True)  # no memset; the backward writes fresh gradients

    def backward_and_step(self, loss, optimizer, parameters=None, clip_grad_norm=None):
        """Backward, optional clipping, optimizer step -- with whatever scaling the mode needs."""
        if self.backend == "apex":
            with self.apex_amp.scale_loss(loss, optimizer) as scaled_loss:
                scaled_loss.backward()
            if clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.apex_amp.master_params(optimizer), clip_grad_norm)
            optimizer.step()
            return
        if self.scaler is None:
            loss.backward()
            if clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
            optimizer.step()
            return
        # GradScaler's public API only (its per-optimizer overflow flags are private). update() halves the scale
        # exactly when the step overflowed and was skipped (and a static scale never grows), so a scale that
        # went down counts a skipped step: compared on the device, no host sync.
        scale_before = self.scaler.scale(self._one)
        self.scaler.scale(loss).backward()
        if clip_grad_norm:
            self.scaler.unscale_(optimizer)  # clip the real gradients (step() unscales them otherwise)
            torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
        self.scaler.step(optimizer)  # skipped when a gradient is inf/nan
        self.scaler.update()
        self.skipped_steps += self.scaler.scale(self._one) < scale_before
        if self.static_scale:
            self.scaler.update(self.loss_scale)  # undo an overflow's back-off: the scale stays the one given

    def current_scale(self):
        if self.scaler is not None:
            return self.scaler.get_scale()
        return None

    # -- checkpoints ---------------------------------------------------------
    def state_dict(self):
        state = {"backend": self.backend, "skipped_steps": int(self.skipped_steps)}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
            if self.static_scale:
                # Its growth tracker counts clean steps towards a growth that never comes: not state. Saved as 0,
                # so a run resumed with a dynamic scale starts its growth interval afresh.
                state["scaler"]["_growth_tracker"] = 0
        if self.apex_amp is not None:
            state["apex"] = self.apex_amp.state_dict()
        return state

    def load_state_dict(self, state):
        if not state:
            return
        self.skipped_steps.fill_(int(state.get("skipped_steps", 0)))
        # A dynamic scale and its growth tracker are state and resume where they were. A static scale is this
        # run's configuration (--loss_scale_value N), so it is not overwritten by the checkpoint's.
        if self.scaler is not None and state.get("scaler") and not self.static_scale:
            self.scaler.load_state_dict(state["scaler"])
            self.scaler.set_growth_interval(self.growth_interval)  # the schedule follows this run's settings
            self.scaler.set_growth_factor(2.0)
            self.scaler.set_backoff_factor(0.5)
        if self.apex_amp is not None and "apex" in state:
            self.apex_amp.load_state_dict(state["apex"])


def build_mixed_precision(args, device):
    """Turn --amp/--apex/--amp-backend/--amp-dtype/--apex-opt-level/--loss_scale_value into a MixedPrecision.
    Fails here, before any data is read, when the backend asked for cannot run."""
    opt_level = args.apex_opt_level or DEFAULT_OPT_LEVEL
    loss_scale = parse_loss_scale(args.loss_scale_value) or DEFAULT_LOSS_SCALE
    if not (args.amp or args.apex) or opt_level == "O0":
        return MixedPrecision(device=device, opt_level=opt_level)
    flag = "--apex" if args.apex else "--amp-backend apex"
    backend = "apex" if args.apex else args.amp_backend
    if backend == "apex" and device.type == "cpu" and os.environ.get("DENSENET_APEX_ON_CPU") != "1":
        # DENSENET_APEX_ON_CPU=1 lets apex drive a CPU run: the tests do, with the stand-in of test/apex_standin.
        raise DeviceError(f"{flag}: apex amp runs on NPU/CUDA only; on the CPU use --amp (native torch.amp)")
    if backend == "apex" and _import_apex_amp() is None:
        if device.type == "cuda":
            raise DeviceError(f"{flag}: apex.amp is not available; NVIDIA's apex has removed apex.amp (2025) in "
                              f"favour of torch.amp: on a GPU drop {flag} and use --amp (native torch.amp)")
        raise DeviceError(f"{flag}: apex is not installed. Ascend's apex is built from source "
                          "(https://gitee.com/ascend/apex), not PyPI's 'apex' "
                          f"(or drop {flag} to use native torch.amp)")
    if backend == "auto":
        backend = "apex" if device.type == "npu" and _import_apex_amp() is not None else "native"
    notes = []
    if backend == "apex":
        amp = MixedPrecision(device=device, backend="apex", dtype=torch.float16, loss_scale=loss_scale,
                             opt_level=opt_level)
        if device.type == "npu" and not amp.npu_fused:
            amp.notes.append(f"plain torch SGD (Ascend's NpuFusedSGD supports opt levels "
                             f"{'/'.join(APEX_FUSED_SGD_OPT_LEVELS)} only)")
        return amp
    if device.type == "npu":
        notes.append("apex is not installed: native torch.amp")
    elif args.apex_opt_level is not None:
        notes.append(f"apex AMP is used on Ascend NPUs only; --apex-opt-level {opt_level} means autocast here "
                     f"(fp32 weights, per-op casts, no fp16 model copy)")
    dtype = device.default_amp_dtype() if args.amp_dtype == "auto" else AMP_DTYPES[args.amp_dtype]
    if dtype == torch.float32:
        notes.append("this CPU has no native bf16 (AVX512-BF16/AMX), where bf16 is emulated and slower than "
                     "fp32: --amp runs fp32 (--amp-dtype bf16 forces bf16)")
    elif dtype == torch.bfloat16:
        if args.loss_scale_value is not None:
            notes.append(f"--loss_scale_value {args.loss_scale_value} not used: bf16 needs no loss scaling")
        loss_scale = None
    return MixedPrecision(device=device, backend="native", dtype=dtype, loss_scale=loss_scale, opt_level=opt_level,
                          notes=notes)


# ----------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------

def build_sgd(param_groups, lr, momentum, device, amp=None):
    """SGD with momentum, using the fastest kernel the device has (same numerics everywhere).

    GradScaler with the foreach SGD reads the overflow flag on the host every step (a sync); the fused
    CUDA SGD takes it on the device (_step_supports_amp_scaling). On Ascend, apex's NpuFusedSGD is the
    fused kernel; native fp16 there pays that sync (see README, Mixed precision)."""
    if amp is not None and amp.npu_fused:
        from apex.optimizers import NpuFusedSGD  # Ascend fork: one fused kernel for all params
        return NpuFusedSGD(param_groups, lr=lr, momentum=momentum)
    if device.type == "cuda":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, fused=True)
    return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, foreach=True)
