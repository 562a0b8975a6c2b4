"""Throughput benchmark: a plain PyTorch loop against this repo's training step, in one process, same inputs.

    python benchmark.py                                     # compute, pipeline, e2e, scaling (~8 min, 2 CPU cores)
    python benchmark.py --sections compute                  # DenseNet-201 224, synthetic (batch 16 CPU, 128 GPU/NPU)
    python benchmark.py --sections compute -b 128,256 --amp-dtype fp16 --channels-last both --compile --json r.json
    python benchmark.py --sections pipeline,e2e --data-dir /data/imagenet/train
    python benchmark.py --sections scaling --scaling-batches 8,16 --scaling-sizes 160,224 --scaling-procs 1,2
    python benchmark.py --sections control --control-procs 2,4      # the per-step control collective's cost

What is timed is what trains: "ours" is trainer.build_trainer(...) + Trainer.step (the step main.py's epoch
loop runs, plus that loop's device-side loss/accuracy sums, main.Meter), configured by main.py's own argument
parser (--amp, --amp-dtype, --loss_scale_value, --compile), with device.configure_backends as main.py applies it
(cudnn.benchmark on CUDA). img/s is always the MEDIAN of --windows timed windows of --steps steps, after --warmup
untimed steps; the device is synchronised at each window's ends. Defaults: on an accelerator (cuda/npu) batch 128,
10 warm-up steps, 5 windows of 20 steps; on the CPU batch 16, 1 warm-up step, 3 windows of 2 steps.

Sections:
  compute   training step on one synthetic batch, for each batch size of -b (a comma list, e.g. 128,256).
            Input placement, the same for every configuration: a uint8 batch in host memory (pinned on
            accelerators), copied and normalised on the device at every step by data.DeviceNormalize (ours in
            its memory format, the references NCHW). Plain baselines, in the same process: torchvision's densenet,
            NCHW, eager, torch.optim.SGD, zero_grad(), loss.item() every step (as torchvision's reference script):
              reference fp32  no autocast                                              (--references fp32)
              reference AMP   torch.autocast at the AMP dtype (--amp-dtype; auto: the device's default, as
                              main.py --amp), + torch.amp.GradScaler (dynamic) for fp16  (--references amp)
                              -- skipped where the AMP dtype is fp32 (a CPU without native bf16)
            Ours: --amp at that dtype in the device's default memory format (channels_last on cpu/cuda; the
            other one too with --channels-last both), fp32 NCHW and fp32 channels_last next to the fp32
            reference (unless --no-ours-fp32), and with --compile ours + torch.compile (static shapes; the
            compile time is the first step, reported apart and excluded from the windows).
            Ratios are against both references. On accelerators the peak device memory of each configuration
            is reported: max_memory_allocated over its warm-up, less what the other configurations hold.
  pipeline  input pipeline alone, one process, one thread: images/s per CPU core on ImageNet-sized JPEGs
            (~500x375, generated from scikit-learn's two sample photos unless --data-dir). reference =
            torchvision ImageFolder + PIL + RandomResizedCrop + flip + ToTensor + Normalize + default_collate;
            ours = data.train_dataset(fast_decode=True) + collate_skip_bad + DeviceNormalize (counted here
            because on a CPU the "device" normalisation costs this core too).
  e2e       "is one device input-bound?": ours on those JPEGs from disk through the DataLoader (--workers,
            default data.default_workers(1)) vs ours on synthetic data, one process, plus the loader alone.
            The sampler cycles over the files without epoch ends (no worker restarts), as on a dataset far
            larger than a batch. Here each side brings its own pipeline (that is what is compared): ours uint8
            workers + DeviceNormalize, the reference torchvision's float pipeline and loop (AMP where the device
            has an AMP dtype, else fp32).
  scaling   ours only: batch size, resolution, and 1 vs N processes (DDP via build_trainer(distributed=True);
            gloo on CPU, nccl on CUDA) at the same global batch.
  control   the control collective of main.py's training loop, launch_lib.any_rank(flag, flag) (a blocking all-reduce
            of two flags on the gloo side group): with N spawned ranks (--control-procs, on this host), the
            median and 90th percentile of --control-calls back-to-back calls (the collective's own latency; a
            rank that arrives late makes the others wait longer still), and its share of one DDP training step
            of ours at the same global batch (-b, --image-size; median of the windows); then what the step
            pays for it as main.py runs it, started a step ahead (launch_lib.any_rank_async) and read after the
            step. Not in the default list: add it to --sections.

--json PATH writes {"meta": {...}, "results": {label: {"img_per_s": [one per window], "median": ...,
"peak_memory_mib": ... (null on CPU), "compile_s": ..., "section", "batch", "kind", "precision", "layout",
"compiled", "vs_reference_fp32", "vs_reference_amp"}}} after every section (a killed run leaves what it had).
"""
import argparse
import contextlib
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)

import data as data_lib  # noqa: E402
import decode  # noqa: E402
import densenet  # noqa: E402
import device as device_lib  # noqa: E402
import main as main_lib  # noqa: E402
import trainer as trainer_lib  # noqa: E402
import launch as launch_lib  # noqa: E402

SECTIONS = ("compute", "pipeline", "e2e", "scaling", "control")
DEFAULT_SECTIONS = ("compute", "pipeline", "e2e", "scaling")
REFERENCES = ("fp32", "amp")
# (batch size, warm-up steps, steps per window, windows) when not given
ACCELERATOR_DEFAULTS = ("128", 10, 20, 5)
CPU_DEFAULTS = ("16", 1, 2, 3)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    a = p.add_argument
    a("--sections", default=",".join(DEFAULT_SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    a("--device", default="auto", choices=device_lib.DEVICE_TYPES)
    a("--model", default="densenet201", choices=sorted(densenet.MODELS))
    a("-b", "--batch-size", default=None,
      help="batch size; a comma list (128,256) times compute at each, the other sections use the first "
           "(default: 128 on an accelerator, 16 on the CPU)")
    a("--image-size", type=int, default=224)
    a("--steps", type=int, default=None, help="training steps per timed window (default: 20 accelerator, 2 CPU)")
    a("--windows", type=int, default=None, help="timed windows; the median is reported (default: 5 / 3)")
    a("--warmup", type=int, default=None,
      help="untimed steps before the windows: allocator, cuDNN/oneDNN algorithm choice (default: 10 / 1)")
    a("--amp-dtype", default="auto", choices=["auto", "bf16", "fp16"],
      help="dtype of ours (as main.py --amp --amp-dtype) and of the AMP reference; auto: the device's default")
    a("--loss-scale-value", default=None,
      help="ours' fp16 loss scale, as main.py --loss_scale_value (default: main.py's, static 1024)")
    a("--channels-last", default="default", choices=["default", "on", "off", "both"],
      help="memory format(s) of ours at AMP in compute (default: the device's: channels_last on cpu/cuda)")
    a("--references", default=",".join(REFERENCES),
      help="plain baselines to time: fp32 and/or amp (torchvision under autocast); '' for none")
    a("--no-reference", action="store_true", help="same as --references '' (the references are the slow ones)")
    a("--no-ours-fp32", action="store_true", help="compute: skip ours fp32 NCHW / channels_last")
    a("--compile", action="store_true", help="compute: also time ours + torch.compile (compile time apart)")
    a("--json", default=None, metavar="PATH", help="also write the results here (label -> img/s, median, memory)")
    a("--images", type=int, default=200, help="JPEGs to generate for pipeline/e2e (pipeline: files per pass)")
    a("--data-dir", default=None, help="use this class-folder tree of real images instead of generating")
    a("--workers", type=int, default=None, help="e2e DataLoader workers (default: data.default_workers(1))")
    a("--pipeline-passes", type=int, default=5, help="timed passes over the images in the pipeline section")
    a("--scaling-batches", default="8,16,32")
    a("--scaling-sizes", default="112,160,224")
    a("--scaling-procs", default="1,2")
    a("--control-procs", default="2,4", help="control: numbers of ranks (each >= 2)")
    a("--control-calls", type=int, default=2000, help="control: timed any_rank calls per rank count")
    a("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    args.references = [] if args.no_reference else [r.strip() for r in args.references.split(",") if r.strip()]
    if set(args.references) - set(REFERENCES):
        p.error(f"--references: choose from {','.join(REFERENCES)}, got {args.references}")
    try:
        if args.batch_size is not None and (not ints(args.batch_size) or min(ints(args.batch_size)) <= 0):
            raise ValueError
    except ValueError:
        p.error(f"-b/--batch-size: positive integers separated by commas, got {args.batch_size!r}")
    for name in ("steps", "windows"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be >= 0")
    if "control" in args.sections and (not ints(args.control_procs) or min(ints(args.control_procs)) < 2
                                       or args.control_calls < 1):
        p.error("--control-procs: rank counts >= 2, separated by commas; --control-calls >= 1")
    return args


def apply_device_defaults(args, device):
    """Fill in what depends on the device: an accelerator needs bigger batches and more steps to be measured."""
    batch, warmup, steps, windows = ACCELERATOR_DEFAULTS if device.is_accelerator else CPU_DEFAULTS
    args.batch_sizes = ints(args.batch_size if args.batch_size is not None else batch)
    args.batch_size = args.batch_sizes[0]
    args.warmup = warmup if args.warmup is None else args.warmup
    args.steps = steps if args.steps is None else args.steps
    args.windows = windows if args.windows is None else args.windows
    return args


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
    """This repo's trainer for one configuration, from main.py's parser and trainer.build_trainer.
    Cheap to make (arguments and MixedPrecision only); build() makes the model."""

    def __init__(self, device, args, batch_size, *, amp=True, channels_last=None, compile=False, distributed=False,
                 world_size=1):
        argv = ["--synthetic", "--device", device.type, "--model", args.model, "-b", str(batch_size),
                "--num_classes", "1000", "--amp-dtype", args.amp_dtype, "--seed", str(args.seed)]
        argv += ["--amp"] if amp else []
        argv += ["--compile"] if compile else []
        if args.loss_scale_value is not None:
            argv += ["--loss_scale_value", str(args.loss_scale_value)]
        self.args = main_lib.get_args_parser().parse_args(argv)
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
    """Trainer.step -- the step main.train_one_epoch runs -- with that loop's per-step bookkeeping on the device
    (main.Meter: loss and accuracy sums; no host sync), on a fixed batch or from a loader/iterator."""
    meter = main_lib.Meter(trainer.device.torch_device)
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


# ----------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------

def section_compute(args, device, memory):
    amp_dtype = reference_amp_dtype(args, device)
    for b in args.batch_sizes:
        out(f"== compute: {args.model} {args.image_size}x{args.image_size}, batch {b}, synthetic uint8 batch "
            f"({'pinned ' if device.is_accelerator else ''}host memory) normalised on the device, "
            f"{device.describe()} ==")
        batch = synthetic_batch(b, args.image_size, seed=args.seed, pin_memory=device.is_accelerator)
        configs, ref_labels = [], {}
        if "fp32" in args.references:
            ref_labels["fp32"] = f"reference fp32 (torchvision {args.model}, NCHW, eager)"
            configs.append(Config(ref_labels["fp32"], lambda: reference_step_fn(device, args.model, batch,
                                                                                  seed=args.seed), b,
                                  dict(kind="reference", precision="fp32", layout="NCHW", compiled=False)))
        if "amp" in args.references:
            if amp_dtype == torch.float32:
                out(f"  (reference AMP skipped: --amp means fp32 on this {device.type}; --amp-dtype bf16 forces it)")
            else:
                name = dtype_name(amp_dtype)
                ref_labels["amp"] = (f"reference AMP (torchvision {args.model}, {name} autocast"
                                     f"{' + GradScaler' if amp_dtype == torch.float16 else ''}, NCHW, eager)")
                configs.append(Config(ref_labels["amp"], lambda: reference_step_fn(
                    device, args.model, batch, amp_dtype=amp_dtype, seed=args.seed), b,
                    dict(kind="reference", precision=name, layout="NCHW", compiled=False)))
        variants = []
        if "fp32" in args.references and not args.no_ours_fp32:
            variants += [dict(amp=False, channels_last=False), dict(amp=False, channels_last=True)]
        default = device.channels_last_default
        layouts = {"default": [default], "on": [True], "off": [False], "both": [default, not default]}
        layouts = layouts[args.channels_last]
        variants += [dict(amp=True, channels_last=cl) for cl in layouts]
        if args.compile:
            variants.append(dict(amp=True, channels_last=layouts[0], compile=True))
        seen = {}
        for kw in variants:
            spec = OursSpec(device, args, b, **kw)
            key = (spec.precision, spec.layout, spec.compile)
            if key in seen:  # e.g. --amp is fp32 on this CPU: "ours default" is "ours fp32 channels_last"
                if spec.is_default and not seen[key].fields["default"]:
                    seen[key].label += " (= default)"
                    seen[key].fields["default"] = True
                continue
            label = f"ours {spec.describe()}" + (" (default)" if spec.is_default else "")
            if spec.precision == "fp32" and not spec.channels_last and "fp32" in ref_labels:
                label += " (same math as reference fp32)"
            configs.append(Config(label, lambda spec=spec: ours_step_fn(spec.build(), spec.args, batch), b,
                                  dict(kind="ours", precision=spec.precision, layout=spec.layout,
                                       compiled=spec.compile, default=spec.is_default), compile=spec.compile))
            seen[key] = configs[-1]
        rates = measure(configs, device, memory, args.warmup, args.steps, args.windows)
        refs = {k: statistics.median(rates[v]) for k, v in ref_labels.items() if v in rates}
        width = max([len(c.label) for c in configs] + [40])
        for c in configs:
            if c.label not in rates:
                record(f"compute b{b}: {c.label}", "compute", [], batch=b, error="out of memory", **c.fields)
                continue
            median = statistics.median(rates[c.label])
            out(f"  {c.label:<{width}} {fmt_rates(rates[c.label])}{fmt_mib(c.peak_mib)}")
            record(f"compute b{b}: {c.label}", "compute", rates[c.label], batch=b, image_size=args.image_size,
                   model=args.model, peak_memory_mib=None if c.peak_mib is None else round(c.peak_mib, 1),
                   compile_s=None if c.compile_s is None else round(c.compile_s, 1),
                   vs_reference_fp32=round(median / refs["fp32"], 3) if "fp32" in refs else None,
                   vs_reference_amp=round(median / refs["amp"], 3) if "amp" in refs else None, **c.fields)
        for kind, ref in refs.items():
            out(f"  speed-up vs {ref_labels[kind]}:")
            for c in configs:
                if c.label in rates and c.label != ref_labels[kind]:
                    out(f"    {c.label:<{width}} {statistics.median(rates[c.label]) / ref:6.2f}x")
        for c in configs:
            c.step = None  # the models go now, before the next batch size's
        del configs, c
        memory.release()


def make_imagenet_like_jpegs(root, count, seed=0):
    """`count` JPEGs of ImageNet's typical sizes (~500x375, quality 85-95, 4:2:0) in 4 class folders, cut from
    scikit-learn's two real sample photos with random crops, flips and resizes."""
    import numpy as np
    from PIL import Image
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        sys.exit("benchmark.py: generating test JPEGs needs scikit-learn (its two sample photos): "
                 "pip install scikit-learn, or pass --data-dir FOLDER_OF_CLASS_FOLDERS")
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    sizes = [(500, 375), (500, 375), (500, 375), (500, 333), (375, 500), (500, 400), (333, 500), (500, 500)]
    for c in range(4):
        os.makedirs(os.path.join(root, f"class_{c}"), exist_ok=True)
    for i in range(count):
        src = photos[i % len(photos)]
        w, h = src.size
        f = rng.uniform(0.5, 1.0)
        cw, ch = int(w * f), int(h * f)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = src.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img = img.resize(sizes[int(rng.integers(len(sizes)))], Image.BICUBIC)
        img.save(os.path.join(root, f"class_{i % 4}", f"img_{i:04d}.JPEG"), quality=int(rng.integers(85, 96)))
    return root


def reference_pipeline_dataset(root, size):
    import torchvision
    from torchvision import transforms as T
    return torchvision.datasets.ImageFolder(root, T.Compose([
        T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
        T.Normalize(data_lib.IMAGENET_MEAN, data_lib.IMAGENET_STD)]))


@contextlib.contextmanager
def torch_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def section_pipeline(args, root):
    from torch.utils.data import default_collate
    n_files = sum(len(files) for _, _, files in os.walk(root))
    out(f"== pipeline: {n_files} JPEGs from {root}, {args.image_size} crops, batch {args.batch_size}, "
        f"1 process, 1 thread (images/s per CPU core) ==")
    cpu = device_lib.resolve_device("cpu")
    normalize = data_lib.DeviceNormalize(cpu.torch_device, True)
    ref = reference_pipeline_dataset(root, args.image_size)
    fast = data_lib.train_dataset(root, args.image_size, fast_decode=True, seed=args.seed)
    pil = data_lib.train_dataset(root, args.image_size, fast_decode=False, seed=args.seed)
    n, bs = min(len(ref), args.images), args.batch_size  # a pass: the first --images files

    def one_pass(ds, collate, post=None, epoch=0):
        def run():
            for s in range(0, n, bs):
                indices = range(s, min(s + bs, n))
                keys = indices if ds is ref else [(epoch, i, 0) for i in indices]
                batch = collate([ds[k] for k in keys])
                if post:
                    post(batch)
        return run
    configs = [("reference (PIL, RRC, flip, ToTensor, Normalize)", ref, default_collate, None),
               ("ours --no-fast-decode (PIL, uint8, + normalise)", pil, data_lib.collate_skip_bad,
                lambda b: normalize(b.images)),
               ("ours default (fast decode, uint8, + normalise)", fast, data_lib.collate_skip_bad,
                lambda b: normalize(b.images)),
               ("ours default, workers' share only (no normalise)", fast, data_lib.collate_skip_bad, None)]
    with torch_threads(1):  # one warm-up pass each (page cache, allocator), then the passes round-robin
        results = interleaved([(label, one_pass(ds, collate, post), n) for label, ds, collate, post in configs],
                              cpu, 1, 1, args.pipeline_passes)
    ref_rate = statistics.median(results[configs[0][0]])
    for label, rates in results.items():
        out(f"  {label:<52} {fmt_rates(rates)}")
        record(f"pipeline: {label}", "pipeline", rates, kind="reference" if label == configs[0][0] else "ours",
               unit="images/s per core", vs_reference=round(statistics.median(rates) / ref_rate, 3))
    for label, rates in list(results.items())[1:]:
        out(f"  vs reference: {label:<46} {statistics.median(rates) / ref_rate:6.2f}x")
    reduced_decode_note(args, root)
    return results


def reduced_decode_note(args, root):
    """How often RandomResizedCrop leaves room for libjpeg's 1/2-1/8 decoding, and what it buys."""
    import io
    from PIL import Image
    from torchvision import transforms
    crop = decode.FastRandomResizedCrop(args.image_size)
    rows = []
    header = type("Header", (), {"format": "JPEG", "mode": "RGB"})()
    h, w = 375, 500
    for out_size in sorted({128, 176, args.image_size}):
        crop.size = (out_size, out_size)
        hits = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for _ in range(2000):
                _, _, ch, cw = transforms.RandomResizedCrop.get_params(
                    torch.empty(1, 1, 1).expand(3, h, w), (0.08, 1.0), (3 / 4, 4 / 3))
                hits += crop.reduction(ch, cw, header) > 1
        rows.append(f"{out_size}px: {100 * hits / 2000:.1f}%")
    out(f"  reduced-size JPEG decoding applies to this share of crops of a 500x375 image: {', '.join(rows)}")
    # decode cost at full vs reduced scale on the same files
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs][:50]
    blobs = [open(f, "rb").read() for f in files]

    def decode_all(scale):
        for b in blobs:
            with Image.open(io.BytesIO(b)) as img:
                if scale > 1:
                    img.draft("RGB", (img.size[0] // scale, img.size[1] // scale))
                img.load()
    cost = {}
    with torch_threads(1):
        for scale in (1, 2, 4):
            decode_all(scale)
            start = time.perf_counter()
            decode_all(scale)
            cost[scale] = (time.perf_counter() - start) / len(blobs) * 1e3
    out(f"  PIL decode per file: full {cost[1]:.2f} ms, 1/2 scale {cost[2]:.2f} ms, 1/4 scale {cost[4]:.2f} ms")
    # where it does apply: big photos (1600x1200, as from a phone or OpenImages), same crops
    with tempfile.TemporaryDirectory(prefix="benchmark_big_") as big:
        from sklearn.datasets import load_sample_images
        os.makedirs(os.path.join(big, "c"))
        for k, a in enumerate(load_sample_images().images * 10):
            Image.fromarray(a).transpose(Image.FLIP_LEFT_RIGHT if k % 4 >= 2 else Image.NONE).resize(
                (1600, 1200), Image.BICUBIC).save(os.path.join(big, "c", f"{k}.jpg"), quality=90)
        rates = {}
        for reduce in (False, True):
            ds = data_lib.train_dataset(big, args.image_size, fast_decode=True, seed=args.seed)
            ds.transform.transforms[0].reduced_decode = reduce  # the decode.FastRandomResizedCrop
            with torch_threads(1):
                passes = [ds[(e, i, 0)] for e in range(1) for i in range(len(ds))]  # warm
                start = time.perf_counter()
                for e in range(1, 3):
                    passes = [ds[(e, i, 0)] for i in range(len(ds))]
                rates[reduce] = 2 * len(ds) / (time.perf_counter() - start)
        del passes
    out(f"  1600x1200 photos, {args.image_size} crops, fast path: reduced decode off {rates[False]:.1f} img/s, "
        f"on {rates[True]:.1f} img/s ({rates[True] / rates[False]:.2f}x)")


def infinite_batches(loader):
    epoch = 0
    while True:
        if getattr(loader, "sampler", None) is not None and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


class Forever:
    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return infinite_batches(self.loader)


class CyclingSampler(torch.utils.data.Sampler):
    """A fresh permutation of the files per pass, pass after pass, in ONE DataLoader iteration: no epoch ends,
    so no worker restarts or refills, as on a training set thousands of batches long. keys=True yields
    data.ImageFolderDataset's (pass, index, 0) keys (a new crop per pass), else plain indices."""

    def __init__(self, dataset_size, seed=0, keys=True, length=10 ** 9):
        self.dataset_size, self.seed, self.keys, self.length = dataset_size, seed, keys, length

    def __iter__(self):
        n = 0
        for p in range(self.length):
            for i in torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(self.seed + p)).tolist():
                if n == self.length:
                    return
                yield (p, i, 0) if self.keys else i
                n += 1

    def __len__(self):
        return self.length


def section_e2e(args, device, memory, root):
    workers = data_lib.default_workers(1) if args.workers is None else args.workers
    b = args.batch_size
    out(f"== e2e: {args.model} {args.image_size}, batch {b}, real JPEGs from {root} with {workers} "
        f"DataLoader worker(s) vs synthetic, 1 process, {device.describe()} ==")
    pin = device.is_accelerator
    spec = OursSpec(device, args, b)
    trainer = spec.build()
    synthetic_step = ours_step_fn(trainer, spec.args, synthetic_batch(b, args.image_size, seed=args.seed,
                                                                      pin_memory=pin))
    # Synthetic windows before and after the real-data ones, so a drift in outside load shows in both.
    synthetic = time_windows(synthetic_step, b, device, args.warmup, args.steps, args.windows)
    train = data_lib.train_dataset(root, args.image_size, fast_decode=True, seed=args.seed)
    loader = data_lib.make_loader(train, CyclingSampler(len(train), args.seed), b, workers, pin, args.seed,
                                  drop_last=True)
    batches = iter(loader)
    # Not interleaved with the synthetic windows: the workers would refill their prefetch queue meanwhile and
    # hide a data bottleneck. Warm up past the queue's depth instead, so the windows see the steady state.
    warm = max(args.warmup, 4 * workers + 1)
    loader_alone = time_windows(lambda it=batches: next(it), b, device, warm, args.steps, args.windows)
    real = time_windows(ours_step_fn(trainer, spec.args, loader=batches), b, device, warm, args.steps,
                        args.windows)
    del batches, loader
    synthetic += time_windows(synthetic_step, b, device, 0, args.steps, args.windows)
    label = f"ours {spec.describe()}"
    out(f"  {'loader alone (fast decode, uint8 batches' + (', pinned)' if pin else ')'):<56} {fmt_rates(loader_alone)}")
    out(f"  {'ours, synthetic data (windows before + after)':<56} {fmt_rates(synthetic)}")
    out(f"  {'ours, real JPEGs (fast decode)':<56} {fmt_rates(real)}")
    common = dict(batch=b, image_size=args.image_size, model=args.model, workers=workers)
    record("e2e: loader alone", "e2e", loader_alone, kind="loader", **common)
    record(f"e2e: {label}, synthetic", "e2e", synthetic, kind="ours", data="synthetic", precision=spec.precision,
           layout=spec.layout, **common)
    record(f"e2e: {label}, real JPEGs", "e2e", real, kind="ours", data="real", precision=spec.precision,
           layout=spec.layout, **common)
    del synthetic_step, trainer
    memory.release()
    reference = None
    if args.references:
        amp_dtype = reference_amp_dtype(args, device) if "amp" in args.references else torch.float32
        ref_loader = torch.utils.data.DataLoader(
            reference_pipeline_dataset(root, args.image_size), batch_size=b,
            sampler=CyclingSampler(len(train), args.seed, keys=False), num_workers=workers, pin_memory=pin,
            drop_last=True, persistent_workers=workers > 0)
        step = reference_step_fn(device, args.model, loader=ref_loader, amp_dtype=amp_dtype, seed=args.seed)
        reference = time_windows(step, b, device, max(args.warmup, 2 * workers + 1), args.steps, args.windows)
        what = f"reference loop {dtype_name(amp_dtype)}, real JPEGs (torchvision pipeline)"
        out(f"  {what:<56} {fmt_rates(reference)}")
        record(f"e2e: {what}", "e2e", reference, kind="reference", data="real", precision=dtype_name(amp_dtype),
               layout="NCHW", **common)
        del step, ref_loader
        memory.release()
    s, r, lo = (statistics.median(x) for x in (synthetic, real, loader_alone))
    out(f"  ours real / ours synthetic: {r / s:.2f}  ({100 * (1 - r / s):+.1f}% slower)")
    # The loader alone slower than the step: input-bound. Fast enough alone yet real data still >10% slower:
    # the workers and the step contend for the host (CPU cores, memory bandwidth, host-to-device copies).
    verdict = "yes" if lo < 1.05 * s else "contention" if r / s < 0.9 else "no"
    out(f"  input-bound: {dict(yes='YES', no='no', contention='no, but contended')[verdict]} -- the loader alone "
        f"delivers {lo:.1f} img/s with {workers} worker(s), the step on synthetic data takes {s:.1f} img/s; real "
        f"data reaches {100 * r / s:.0f}% of synthetic"
        + (" (loader and step share the host's cores)" if verdict == "contention" else ""))
    RESULTS["e2e: verdict"] = {"section": "e2e", "verdict": verdict, "input_bound": verdict == "yes",
                               "real_over_synthetic": round(r / s, 3), "loader_img_per_s": round(lo, 1),
                               "synthetic_img_per_s": round(s, 1), "real_img_per_s": round(r, 1),
                               "workers": workers, "batch": b}
    if reference is not None:
        out(f"  ours real / reference real: {r / statistics.median(reference):.2f}x")


def _join_job(rank, world, port, args):
    """A spawned rank joins a `world`-rank job on this host as main.py joins its job; returns its device."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    device = device_lib.resolve_device(args.device, rank)
    device_lib.configure_backends(device, deterministic=False)
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.parent_threads // world))  # the same cores, split between ranks
    launch_lib.init_distributed(launch_lib.launcher_env(), device, device.dist_backend)
    return device


def _ddp_step_fn(rank, world, device, args):
    """One DDP training step of ours, at the global batch -b split over the ranks."""
    local = args.batch_size // world
    spec = OursSpec(device, args, local, distributed=True, world_size=world)
    return ours_step_fn(spec.build(), spec.args, synthetic_batch(local, args.image_size, seed=args.seed + rank,
                                                                  pin_memory=device.is_accelerator))


def _ddp_step_rates(rank, world, device, args, step=None):
    """Global img/s of each timed window of ours under DDP, at the global batch -b split over the ranks."""
    import torch.distributed as dist
    step = step or _ddp_step_fn(rank, world, device, args)
    for _ in range(args.warmup):
        step()
    rates = []
    for _ in range(args.windows):
        device.synchronize()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        device.synchronize()
        dist.barrier()
        rates.append(args.batch_size * args.steps / (time.perf_counter() - start))  # global img/s
    return rates


def _scaling_worker(rank, world, port, args, result_path):
    device = _join_job(rank, world, port, args)
    rates = _ddp_step_rates(rank, world, device, args)
    if rank == 0:
        with open(result_path, "w") as f:
            f.write(",".join(str(r) for r in rates))
    launch_lib.cleanup_distributed()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def section_scaling(args, device, memory):
    out(f"== scaling: ours, {args.model}, synthetic, {device.describe()} ==")
    results = {}
    pin = device.is_accelerator
    groups = [(f"batch size (at {args.image_size}px)", [(f"batch {b:<4}", b, args.image_size)
                                                         for b in ints(args.scaling_batches)]),
              (f"resolution (batch {args.batch_size})", [(f"{r}px    ", args.batch_size, r)
                                                       for r in ints(args.scaling_sizes)])]
    for title, cases in groups:
        out(f"  {title}:")
        configs = []
        for label, b, size in cases:
            spec = OursSpec(device, args, b)
            batch = synthetic_batch(b, size, seed=args.seed, pin_memory=pin)
            configs.append(Config(label, lambda spec=spec, batch=batch: ours_step_fn(spec.build(), spec.args, batch),
                                  b, dict(batch=b, image_size=size, precision=spec.precision, layout=spec.layout)))
        rates = measure(configs, device, memory, args.warmup, args.steps, args.windows)
        for c in configs:
            if c.label in rates:
                results[(title, c.label)] = rates[c.label]
                out(f"    {c.label} {fmt_rates(rates[c.label])}{fmt_mib(c.peak_mib)}")
                record(f"scaling {title}: {c.label.strip()}", "scaling", rates[c.label], kind="ours",
                       peak_memory_mib=None if c.peak_mib is None else round(c.peak_mib, 1), **c.fields)
            c.step = None
        del configs, c
        memory.release()
    out(f"  processes (global batch {args.batch_size}, {args.image_size}px; DDP, {device.dist_backend}; "
        f"CPU threads split between processes):")
    args.parent_threads = torch.get_num_threads()
    for world in ints(args.scaling_procs):
        text = _run_ranks(_scaling_worker, world, args, device, f"    {world} processes")
        if text is None:
            continue
        rates = [float(x) for x in text.split(",")]
        results[("procs", world)] = rates
        out(f"    {world} process{'es' if world > 1 else '  '} {fmt_rates(rates)}  (global)")
        record(f"scaling processes: {world}", "scaling", rates, kind="ours", processes=world,
               batch=args.batch_size, image_size=args.image_size)
    return results


def _run_ranks(worker, world, args, device, label):
    """worker(rank, world, port, args, result_path) on `world` spawned ranks of this host; the text rank 0
    wrote to result_path, or None (said after `label`) when the batch or the devices do not allow `world`."""
    if args.batch_size % world:
        out(f"{label}: skipped (batch {args.batch_size} does not divide)")
        return None
    if device.is_accelerator and device.module().device_count() < world:
        out(f"{label}: skipped (only {device.module().device_count()} {device.type} devices)")
        return None
    import torch.multiprocessing as mp
    with tempfile.NamedTemporaryFile(suffix=".txt", delete=False) as f:
        path = f.name
    try:
        mp.spawn(worker, args=(world, free_port(), args, path), nprocs=world, join=True)
        with open(path) as f:
            return f.read()
    finally:
        os.unlink(path)


def _control_worker(rank, world, port, args, result_path):
    device = _join_job(rank, world, port, args)
    # The collective alone, as the training loop calls it (two flags), back to back after a warm-up.
    for _ in range(50):
        launch_lib.any_rank(False, False)
    calls = []
    for _ in range(args.control_calls):
        start = time.perf_counter()
        launch_lib.any_rank(False, False)
        calls.append(time.perf_counter() - start)
    # The training step it is paid on.
    step = _ddp_step_fn(rank, world, device, args)
    rates = _ddp_step_rates(rank, world, device, args, step)
    # As main.py's loop runs it: started a step ahead (launch_lib.any_rank_async), read after the step computed.
    # What the step pays is the start plus the wait for a result that is (nearly always) already there.
    # Both ways, between training steps as in the loop: blocking (the previous loop) and overlapped.
    blocking, overlapped = [], []
    for _ in range(max(args.steps, 5)):
        step()
        start = time.perf_counter()
        launch_lib.any_rank(False, False)
        blocking.append(time.perf_counter() - start)
    for _ in range(max(args.steps, 5)):
        start = time.perf_counter()
        result = launch_lib.any_rank_async(False, False)
        launched = time.perf_counter() - start
        step()
        start = time.perf_counter()
        result()
        overlapped.append(launched + time.perf_counter() - start)
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump({"calls_s": calls, "rates": rates, "blocking_s": blocking, "overlapped_s": overlapped}, f)
    launch_lib.cleanup_distributed()


def section_control(args, device):
    out(f"== control: launch_lib.any_rank (the per-step stop/small-batch agreement) vs a DDP step of ours, "
        f"{args.model} {args.image_size}px, global batch {args.batch_size}, {device.describe()} ==")
    if device.is_accelerator:
        out("  (the collective runs on the gloo side group, over the host, whatever the device)")
    args.parent_threads = torch.get_num_threads()
    results = {}
    for world in ints(args.control_procs):
        text = _run_ranks(_control_worker, world, args, device, f"  {world} ranks")
        if text is None:
            continue
        measured = json.loads(text)
        calls = sorted(measured["calls_s"])
        median_us = statistics.median(calls) * 1e6
        p90_us = calls[int(0.9 * (len(calls) - 1))] * 1e6
        step_s = args.batch_size / statistics.median(measured["rates"])
        share = median_us * 1e-6 / step_s
        results[world] = (median_us, step_s)
        blocking_us = statistics.median(measured["blocking_s"]) * 1e6
        overlapped_us = statistics.median(measured["overlapped_s"]) * 1e6
        out(f"  {world} ranks: any_rank median {median_us:8.1f} us, p90 {p90_us:8.1f} us ({len(calls)} calls); "
            f"step {step_s * 1e3:9.1f} ms (median of {len(measured['rates'])} windows); "
            f"one call per step = {100 * share:.4f}% of the step")
        out(f"    between steps (median of {len(measured['blocking_s'])} steps): blocking {blocking_us:.1f} us "
            f"({100 * blocking_us * 1e-6 / step_s:.4f}% of a step); started a step ahead, as main.py runs it: "
            f"{overlapped_us:.1f} us ({100 * overlapped_us * 1e-6 / step_s:.4f}%)")
        record(f"control: any_rank, {world} ranks", "control", measured["rates"], kind="ours", processes=world,
               batch=args.batch_size, image_size=args.image_size, any_rank_median_us=round(median_us, 2),
               any_rank_p90_us=round(p90_us, 2), any_rank_calls=len(calls), step_s=round(step_s, 6),
               blocking_between_steps_median_us=round(blocking_us, 2), overlapped_median_us=round(overlapped_us, 2),
               any_rank_share_of_step=share)
    return results


def main(argv=None):
    args = get_args(argv)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    device = device_lib.resolve_device(args.device)
    device_lib.configure_backends(device, deterministic=False)  # as main.py: cudnn.benchmark on CUDA
    apply_device_defaults(args, device)
    if args.compile:
        # Static shapes per configuration, as a run with one batch size compiles: a second batch size in this
        # process must not turn the batch dimension dynamic.
        torch._dynamo.config.automatic_dynamic_shapes = False
    memory = Memory(device)
    out(f"benchmark: torch {torch.__version__}, {device.describe()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}; median of {args.windows} windows x {args.steps} steps "
        f"after {args.warmup} warm-up steps; batch {','.join(map(str, args.batch_sizes))}")
    tmp = None
    root = args.data_dir
    if root is None and ({"pipeline", "e2e"} & set(args.sections)):
        tmp = tempfile.TemporaryDirectory(prefix="benchmark_jpegs_")
        start = time.perf_counter()
        root = make_imagenet_like_jpegs(tmp.name, args.images, args.seed)
        out(f"  (generated {args.images} ImageNet-sized JPEGs in {time.perf_counter() - start:.0f} s)")
    t0 = time.perf_counter()
    try:
        for section in args.sections:
            start = time.perf_counter()
            if section == "compute":
                section_compute(args, device, memory)
            elif section == "pipeline":
                section_pipeline(args, root)
            elif section == "e2e":
                section_e2e(args, device, memory, root)
            elif section == "scaling":
                section_scaling(args, device, memory)
            elif section == "control":
                section_control(args, device)
            out(f"  ({section}: {time.perf_counter() - start:.0f} s)")
            write_json(args.json, args, device)
    finally:
        if tmp is not None:
            tmp.cleanup()
    out(f"total {time.perf_counter() - t0:.0f} s; load average now {os.getloadavg()[0]:.2f}"
        + (f"; results in {args.json}" if args.json else ""))


if __name__ == "__main__":
    main()
