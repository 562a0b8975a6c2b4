"""What every benchmark section shares: timing windows, device memory, the results record (--json), and the two
training steps compared -- ours (trainer.build_trainer + Trainer.step, configured by config.get_args_parser, with
the epoch loop's engine.Meter sums) and the plain PyTorch reference loop. The sections are benchmark.py (compute,
e2e), bench_data.py (pipeline) and bench_dist.py (scaling, control); benchmark.py's docstring describes them."""
import gc
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

import config
import data as data_lib
import device as device_lib
import engine
import trainer as trainer_lib


def ints(text):
    return [int(x) for x in str(text).split(",") if x.strip()]


def out(text=""):
    print(text, flush=True)


# ----------------------------------------------------------------------------
# Timing, memory, results
# ----------------------------------------------------------------------------

def time_windows(step, images_per_step, device, warmup, steps, windows):
    """Run `warmup` untimed steps, then `windows` windows of `steps` steps; img/s of each window."""
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(windows):
        device.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        device.synchronize()
        rates.append(images_per_step * steps / (time.perf_counter() - start))
    return rates


def interleaved(configs, device, warmup, steps, windows):
    """Time several configurations fairly on a machine whose load drifts: warm every one up, then run their
    windows round-robin (A B C A B C ...), so a burst of outside load hits all of them alike.
    configs: [(label, step, images_per_step)]; returns {label: [img/s per window]}."""
    for _, step, _ in configs:
        for _ in range(warmup):
            step()
    rates = {label: [] for label, _, _ in configs}
    for _ in range(windows):
        for label, step, images in configs:
            rates[label] += time_windows(step, images, device, 0, steps, 1)
    return rates


def fmt_rates(rates):
    return f"{statistics.median(rates):8.2f} img/s   (windows: {', '.join(f'{r:.2f}' for r in rates)})"


class Memory:
    """Peak device memory through torch.get_device_module(device.type) (torch.cuda, torch.npu); off on the CPU."""

    def __init__(self, device):
        self.index = device.index
        self.mod = torch.get_device_module(device.type) if device.is_accelerator else None
        if self.mod is not None and not all(hasattr(self.mod, f) for f in (
                "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats")):
            self.mod = None

    @property
    def enabled(self):
        return self.mod is not None

    def allocated(self):
        return self.mod.memory_allocated(self.index) if self.mod else 0

    def reset_peak(self):
        if self.mod:
            self.mod.reset_peak_memory_stats(self.index)

    def peak(self):
        return self.mod.max_memory_allocated(self.index) if self.mod else 0

    def release(self):
        gc.collect()
        if self.mod is not None and hasattr(self.mod, "empty_cache"):
            self.mod.empty_cache()


def fmt_mib(mib):
    return f"   peak {mib / 1024:6.2f} GiB" if mib is not None else ""


RESULTS = {}  # label -> record; written by --json


def record(label, section, rates, **fields):
    RESULTS[label] = {"section": section, "img_per_s": [round(r, 3) for r in rates],
                      "median": round(statistics.median(rates), 3) if rates else None, **fields}


def write_json(path, args, device):
    if not path:
        return
    meta = {"torch": torch.__version__, "device": device.describe(), "device_type": device.type,
            "cpus": os.cpu_count(), "model": args.model, "image_size": args.image_size,
            "batch_sizes": args.batch_sizes, "warmup": args.warmup, "steps": args.steps, "windows": args.windows,
            "amp_dtype": args.amp_dtype, "sections": args.sections, "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "results": RESULTS}, f, indent=1)
    os.replace(tmp, path)


def is_out_of_memory(error):
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


@dataclass
class Config:
    """One thing to time: `build()` makes its step function (lazily, so its memory can be attributed to it)."""
    label: str
    build: Callable
    images: int
    fields: dict = field(default_factory=dict)
    compile: bool = False
    step: Optional[Callable] = None
    peak_mib: Optional[float] = None
    compile_s: Optional[float] = None


def measure(configs, device, memory, warmup, steps, windows):
    """Build and warm up each configuration in turn (compile step and peak memory apart), then time all of
    them round-robin as interleaved() does. A configuration that runs out of device memory is reported and
    dropped. Returns {label: [img/s per window]}; fills in each Config's peak_mib and compile_s."""
    for c in configs:
        before = memory.allocated()
        try:
            c.step = c.build()
            if c.compile:
                start = time.perf_counter()
                c.step()
                device.synchronize()
                c.compile_s = time.perf_counter() - start
                out(f"  (torch.compile: {c.label}: first step took {c.compile_s:.1f} s, excluded)")
            memory.reset_peak()
            for _ in range(warmup):
                c.step()
            device.synchronize()
            if memory.enabled:
                c.peak_mib = (memory.peak() - before) / 2 ** 20
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            c.step = None
            out(f"  {c.label}: skipped, out of device memory ({str(e).splitlines()[0][:120]})")
            memory.release()
    return interleaved([(c.label, c.step, c.images) for c in configs if c.step is not None], device, 0, steps,
                       windows)


# ----------------------------------------------------------------------------
# The two training steps
# ----------------------------------------------------------------------------

def reference_amp_dtype(args, device):
    """The AMP reference's dtype: what main.py --amp --amp-dtype would pick (fp32: no AMP on this device)."""
    return device.default_amp_dtype() if args.amp_dtype == "auto" else device_lib.AMP_DTYPES[args.amp_dtype]


def dtype_name(dtype):
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def reference_step_fn(device, model_name, batch=None, loader=None, amp_dtype=torch.float32, num_classes=1000,
                      seed=0):
    """torchvision's DenseNet, NCHW, eager: the loop a plain PyTorch script runs; fp32, or under torch.autocast
    (+ GradScaler for fp16) as torchvision's reference script does with --amp. `batch`: a data.Batch of uint8
    images normalised on the device each step (as ours); `loader`: (float images, targets) batches."""
    import torchvision
    torch.manual_seed(seed)
    dev = device.torch_device
    model = getattr(torchvision.models, model_name)(num_classes=num_classes).to(dev).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    autocast = amp_dtype != torch.float32
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    normalize = data_lib.DeviceNormalize(dev, channels_last=False)
    batches = iter(loader) if loader is not None else None

    def step():
        if batches is not None:
            x, y = next(batches)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        else:
            x, y = normalize(batch.images), batch.targets.to(dev, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=autocast):
            loss = criterion(model(x), y)
        optimizer.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        loss.item()  # the reference logs the loss every step
    return step


class OursSpec:
    """This repo's trainer for one configuration, from main.py's parser (config.get_args_parser) and
    trainer.build_trainer.
    Cheap to make (arguments and MixedPrecision only); build() makes the model."""

    def __init__(self, device, args, batch_size, *, amp=True, channels_last=None, compile=False, distributed=False,
                 world_size=1):
        argv = ["--synthetic", "--device", device.type, "--model", args.model, "-b", str(batch_size),
                "--num_classes", "1000", "--amp-dtype", args.amp_dtype, "--seed", str(args.seed)]
        argv += ["--amp"] if amp else []
        argv += ["--compile"] if compile else []
        if args.loss_scale_value is not None:
            argv += ["--loss_scale_value", str(args.loss_scale_value)]
        self.args = config.get_args_parser().parse_args(argv)
        self.device, self.batch_size, self.seed = device, batch_size, args.seed
        self.distributed, self.world_size = distributed, world_size
        self.channels_last = device.channels_last_default if channels_last is None else channels_last
        self.compile = compile
        self.amp = device_lib.build_mixed_precision(self.args, device)
        self.is_default = amp and self.channels_last == device.channels_last_default and not compile

    @property
    def precision(self):
        if self.amp.backend == "off":
            return "fp32"
        return "apex-fp16" if self.amp.backend == "apex" else dtype_name(self.amp.dtype)

    @property
    def layout(self):
        return "channels_last" if self.channels_last else "NCHW"

    def describe(self):
        amp = self.amp
        if amp.backend == "off":
            text = "fp32"
        elif amp.backend == "apex":
            text = f"apex amp {amp.opt_level}"
        else:
            text = f"{self.precision} autocast"
            if amp.scaler is not None:
                text += f" (static loss scale {amp.loss_scale:g})" if amp.static_scale else " (dynamic loss scale)"
        return f"{self.layout}, {text}" + (" + torch.compile" if self.compile else "")

    def build(self):
        torch.manual_seed(self.seed)
        return trainer_lib.build_trainer(self.args, self.device, 1000, self.amp, channels_last=self.channels_last,
                                         distributed=self.distributed, local_batch=self.batch_size,
                                         world_size=self.world_size, log=lambda *a, **k: None)


def ours_step_fn(trainer, args, batch=None, loader=None):
    """Trainer.step -- the step engine.train_one_epoch runs -- with that loop's per-step bookkeeping on the
    device (engine.Meter: loss and accuracy sums; no host sync), on a fixed batch or from a loader/iterator."""
    meter = engine.Meter(trainer.device.torch_device)
    lr = trainer_lib.learning_rate(args, 0.0)
    batches = iter(loader) if loader is not None else None
    trainer.model.train()

    def step():
        b = next(batches) if batches is not None else batch
        output, loss, targets = trainer.step(b.images, b.targets, lr)
        meter.update(loss * len(b.targets), output, targets)
    return step


def synthetic_batch(batch_size, size, num_classes=1000, seed=0, pin_memory=False):
    """One uint8 batch in host memory (pinned: as the loader hands it over on accelerators)."""
    return data_lib.SyntheticLoader(batch_size, size, num_classes, 1, seed, pin_memory=pin_memory).batch


