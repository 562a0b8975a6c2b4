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
from dataclasses import dataclass

import torch


class DeviceError(RuntimeError):
    """A requested device or optional package is not available (one-line message)."""


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


@dataclass
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

    def supports_bf16(self):
        if self.type == "cpu":
            # Ice Lake and newer x86 (AVX512-BF16 / AMX) run bf16 natively; oneDNN knows.
            return bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)()) and _cpu_has_fast_bf16()
        if self.type == "cuda":
            return torch.cuda.is_bf16_supported()
        return False  # Ascend 910's fast path is fp16; bf16 there is opt-in via --amp-dtype

    def default_amp_dtype(self):
        if self.type == "npu":
            return torch.float16
        if self.type == "cpu":
            # oneDNN's fp16 backward kernels are far slower than bf16 on every CPU we measured (densenet121:
            # 0.45 vs 25.7 img/s), and bf16 needs no loss scaling; CPUs without native bf16 emulate it.
            return torch.bfloat16
        return torch.bfloat16 if self.supports_bf16() else torch.float16

    def describe(self):
        if self.type == "cpu":
            threads = torch.get_num_threads()
            return f"cpu ({threads} thread{'s' if threads > 1 else ''})"
        name = self.module().get_device_name(self.index)
        return f"{self.type}:{self.index} ({name})"


def _cpu_has_fast_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def resolve_device(requested="auto", local_rank=0, device_ids=None):
    """Pick the device for this process and bind it.

    `device_ids` maps local ranks onto physical devices (the reference's
    --device_ids "0,1,2,..."); without it local rank r uses device r.
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
    index = device_ids[local_rank] if device_ids else local_rank
    if index >= count:
        raise DeviceError(f"local rank {local_rank} wants {requested}:{index} but only {count} "
                          f"{requested} device(s) are visible")
    torch.accelerator.set_device_index(index) if hasattr(torch, "accelerator") else \
        torch.get_device_module(requested).set_device(index)
    return Device(requested, index)


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
    """Autocast + loss scaling for one run, whatever the backend.

    Modes:
      * off           -- plain fp32 (--amp not given, or --apex-opt-level O0)
      * native bf16   -- torch.autocast(bf16); bf16 has fp32's range, so no scaler
      * native fp16   -- torch.autocast(fp16) + torch.amp.GradScaler, static or dynamic scale
      * apex          -- apex.amp.initialize(opt_level, loss_scale); Ascend's fork adds combine_grad
    """

    def __init__(self, device, enabled=False, backend="native", dtype=None, loss_scale=None, opt_level="O2",
                 growth_interval=2000):
        self.device = device
        self.enabled = enabled
        self.backend = backend if enabled else "off"
        self.dtype = (dtype or device.default_amp_dtype()) if enabled else torch.float32
        self.opt_level = opt_level
        self.loss_scale = float(loss_scale) if isinstance(loss_scale, (int, float)) else loss_scale
        self.static_scale = isinstance(self.loss_scale, float)
        self.growth_interval = growth_interval
        self.apex_amp = None
        self.scaler = None
        # Steps whose gradients overflowed and were skipped; a device tensor so that counting costs no sync.
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device.torch_device)
        if self.backend == "native" and self.dtype == torch.float16:
            # GradScaler's defaults (x2 after growth_interval clean steps, x0.5 on overflow). It refuses factors
            # of 1, so a static scale is kept instead by resetting it in every update() (see backward_and_step);
            # overflowing steps are still skipped.
            self.scaler = torch.amp.GradScaler(device.type, init_scale=self.loss_scale if self.static_scale
                                               else 2.0 ** 16, growth_interval=growth_interval)

    # -- set-up --------------------------------------------------------------
    def initialize(self, model, optimizer):
        """Hook the backend into model and optimizer (only apex needs to wrap them)."""
        if self.backend != "apex":
            return model, optimizer
        self.apex_amp = _import_apex_amp()
        kwargs = dict(opt_level=self.opt_level,
                      loss_scale=self.loss_scale if isinstance(self.loss_scale, float) else "dynamic")
        if self.device.type == "npu":
            kwargs["combine_grad"] = True  # Ascend fork: fuse gradient buffers for fewer kernel launches
        return self.apex_amp.initialize(model, optimizer, **kwargs)

    def describe(self):
        if self.backend == "off":
            return "fp32 (no mixed precision)"
        if self.backend == "apex":
            scale = self.loss_scale if isinstance(self.loss_scale, float) else "dynamic"
            return f"apex amp opt_level={self.opt_level}, loss scale {scale}"
        dtype = "bf16" if self.dtype == torch.bfloat16 else "fp16"
        text = f"native torch.autocast({self.device.type}, {dtype})"
        if self.opt_level == "O2":
            text += " [apex O2 requested: native AMP keeps fp32 master weights and casts per-op, " \
                    "it has no fp16 model copy]"
        if self.scaler is None:
            return text + ", no loss scaling (bf16 has fp32's exponent range)"
        if isinstance(self.loss_scale, float):
            return text + f", static loss scale {self.loss_scale:g} (overflowing steps skipped)"
        return text + ", dynamic loss scale"

    # -- per step ------------------------------------------------------------
    def autocast(self):
        if self.backend == "native":
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()  # fp32, or apex (which patched the model itself)

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
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)  # real gradients, for clipping and for the overflow check
        if clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
        found_inf = self.scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        for flag in found_inf.values():
            self.skipped_steps += flag.to(self.skipped_steps.device, torch.int64)
        self.scaler.step(optimizer)  # skipped when found_inf
        self.scaler.update(self.loss_scale if self.static_scale else None)

    def current_scale(self):
        if self.scaler is not None:
            return self.scaler.get_scale()
        return None

    # -- checkpoints ---------------------------------------------------------
    def state_dict(self):
        state = {"backend": self.backend, "skipped_steps": int(self.skipped_steps)}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
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
    """Turn --amp/--apex/--amp-backend/--amp-dtype/--apex-opt-level/--loss_scale_value into a MixedPrecision."""
    enabled = bool(args.amp or args.apex) and args.apex_opt_level != "O0"
    backend = "apex" if args.apex else args.amp_backend
    loss_scale = parse_loss_scale(args.loss_scale_value)
    if not enabled:
        return MixedPrecision(device, enabled=False, opt_level=args.apex_opt_level)
    if backend == "apex" and _import_apex_amp() is None:
        flag = "--apex" if args.apex else "--amp-backend apex"
        raise DeviceError(f"{flag}: apex is not installed. It is built from source, not PyPI's 'apex': "
                          "Ascend: https://gitee.com/ascend/apex ; NVIDIA: https://github.com/NVIDIA/apex "
                          f"(or drop {flag} to use native torch.amp)")
    if backend == "apex" and device.type == "cpu":
        raise DeviceError(f"{'--apex' if args.apex else '--amp-backend apex'}: apex amp runs on NPU/CUDA only; "
                          "on the CPU use --amp (native torch.amp)")
    if backend == "auto":
        backend = "apex" if device.type == "npu" and _import_apex_amp() is not None else "native"
    if backend == "apex":
        return MixedPrecision(device, True, "apex", torch.float16, loss_scale, args.apex_opt_level)
    dtype = device.default_amp_dtype() if args.amp_dtype == "auto" else AMP_DTYPES[args.amp_dtype]
    if dtype == torch.bfloat16 and loss_scale is not None and loss_scale != "dynamic":
        loss_scale = None  # no scaler for bf16; main.py logs that the value is ignored
    return MixedPrecision(device, True, "native", dtype, loss_scale, args.apex_opt_level)


# ----------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------

def build_sgd(param_groups, lr, momentum, device, use_apex=False):
    """SGD with momentum, using the fastest kernel the device has (same numerics everywhere)."""
    if use_apex and device.type == "npu":
        try:
            from apex.optimizers import NpuFusedSGD  # Ascend fork: one fused kernel for all params
            return NpuFusedSGD(param_groups, lr=lr, momentum=momentum)
        except ImportError:
            pass
    if device.type == "cuda":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, fused=True)
    return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, foreach=True)
