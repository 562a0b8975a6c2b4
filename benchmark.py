"""Throughput benchmark: a plain PyTorch loop against this repo's training step, in one process, same inputs.

    python benchmark.py                                     # compute, pipeline, e2e, scaling (~8 min, 2 CPU cores)
    python benchmark.py --sections compute                  # DenseNet-201 224, synthetic (batch 16 CPU, 128 GPU/NPU)
    python benchmark.py --sections compute -b 128,256 --amp-dtype fp16 --channels-last both --compile --json r.json
    python benchmark.py --sections pipeline,e2e --data-dir /data/imagenet/train
    python benchmark.py --sections scaling --scaling-batches 8,16 --scaling-sizes 160,224 --scaling-procs 1,2
    python benchmark.py --sections control --control-procs 2,4      # the per-step control collective's cost

What is timed is what trains: "ours" is trainer.build_trainer(...) + Trainer.step (the step the epoch loop,
engine.train_one_epoch, runs, plus that loop's device-side loss/accuracy sums, engine.Meter), configured by
main.py's own argument parser, config.get_args_parser (--amp, --amp-dtype, --loss_scale_value, --compile), with
device.configure_backends as main.py applies it (cudnn.benchmark on CUDA). img/s is always the MEDIAN of
--windows timed windows of --steps steps, after --warmup untimed steps; the device is synchronised at each
window's ends. Defaults: on an accelerator (cuda/npu) batch 128, 10 warm-up steps, 5 windows of 20 steps; on
the CPU batch 16, 1 warm-up step, 3 windows of 2 steps.

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
            default launch.default_workers(1)) vs ours on synthetic data, one process, plus the loader alone.
            The sampler cycles over the files without epoch ends (no worker restarts), as on a dataset far
            larger than a batch. Here each side brings its own pipeline (that is what is compared): ours uint8
            workers + DeviceNormalize, the reference torchvision's float pipeline and loop (AMP where the device
            has an AMP dtype, else fp32).
  scaling   ours only: batch size, resolution, and 1 vs N processes (DDP via build_trainer(distributed=True);
            gloo on CPU, nccl on CUDA) at the same global batch.
  control   the control collective of the training loop, the per-boundary agreement stop.Stop.agreement(images)
            (comm.sum_async: an all-reduce SUM of five int64 -- few images, images, and one flag per stop
            cause -- on the gloo control group, waited for by comm.wait's polling): with N spawned ranks
            (--control-procs, on this host), the median and 90th percentile of --control-calls back-to-back
            agreements (the collective's own latency; a rank that arrives late makes the others wait longer
            still), and its share of one DDP training step of ours at the same global batch (-b, --image-size;
            median of the windows); then what the step pays for it, blocking after the step and as
            engine.train_one_epoch runs it, started a step ahead and read after the step. Not in the default
            list: add it to --sections.

--json PATH writes {"meta": {...}, "results": {label: {"img_per_s": [one per window], "median": ...,
"peak_memory_mib": ... (null on CPU), "compile_s": ..., "section", "batch", "kind", "precision", "layout",
"compiled", "vs_reference_fp32", "vs_reference_amp"}}} after every section (a killed run leaves what it had).

Code: this file is the command line and the compute and e2e sections; bench_core.py what the sections share
(timing, memory, results, the two training steps), bench_data.py the JPEGs and the pipeline section, bench_dist.py
the sections that spawn ranks (scaling, control).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)

import data as data_lib  # noqa: E402
import densenet  # noqa: E402
import device as device_lib  # noqa: E402
import launch as launch_lib  # noqa: E402
import lifecycle  # noqa: E402
from bench_core import (RESULTS, Config, Memory, OursSpec, dtype_name, fmt_mib, fmt_rates, ints,  # noqa: E402
                        measure, ours_step_fn, out, record, reference_amp_dtype, reference_step_fn, synthetic_batch,
                        time_windows, write_json)
from bench_data import (CyclingSampler, make_imagenet_like_jpegs, reference_pipeline_dataset,  # noqa: E402
                        section_pipeline)
from bench_dist import section_control, section_scaling  # noqa: E402


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
    a("--workers", type=int, default=None, help="e2e DataLoader workers (default: launch.default_workers(1))")
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



# ----------------------------------------------------------------------------
# compute
# ----------------------------------------------------------------------------

def section_compute(args, device, memory):
    for b in args.batch_sizes:
        out(f"== compute: {args.model} {args.image_size}x{args.image_size}, batch {b}, synthetic uint8 batch "
            f"({'pinned ' if device.is_accelerator else ''}host memory) normalised on the device, "
            f"{device.describe()} ==")
        batch = synthetic_batch(b, args.image_size, seed=args.seed, pin_memory=device.is_accelerator)
        configs, ref_labels = reference_configs(args, device, batch, b)
        configs += ours_configs(args, device, batch, b, same_math_as="fp32" in ref_labels)
        rates = measure(configs, device, memory, args.warmup, args.steps, args.windows)
        report_compute(args, b, configs, rates, ref_labels)
        for c in configs:
            c.step = None  # the models go now, before the next batch size's
        del configs, c
        memory.release()


def reference_configs(args, device, batch, b):
    """The plain baselines of --references on `batch`: ([Config], {"fp32"/"amp": label})."""
    amp_dtype = reference_amp_dtype(args, device)
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
    return configs, ref_labels


def ours_variants(args, device):
    """The keyword arguments of OursSpec for each configuration of ours to time."""
    variants = []
    if "fp32" in args.references and not args.no_ours_fp32:
        variants += [dict(amp=False, channels_last=False), dict(amp=False, channels_last=True)]
    default = device.channels_last_default
    layouts = {"default": [default], "on": [True], "off": [False], "both": [default, not default]}
    layouts = layouts[args.channels_last]
    variants += [dict(amp=True, channels_last=cl) for cl in layouts]
    if args.compile:
        variants.append(dict(amp=True, channels_last=layouts[0], compile=True))
    return variants


def ours_configs(args, device, batch, b, same_math_as):
    """Ours in each of ours_variants on `batch`, each configuration once (same_math_as: the fp32 reference is
    timed, and ours fp32 NCHW says it computes the same)."""
    configs, seen = [], {}
    for kw in ours_variants(args, device):
        spec = OursSpec(device, args, b, **kw)
        key = (spec.precision, spec.layout, spec.compile)
        if key in seen:  # e.g. --amp is fp32 on this CPU: "ours default" is "ours fp32 channels_last"
            if spec.is_default and not seen[key].fields["default"]:
                seen[key].label += " (= default)"
                seen[key].fields["default"] = True
            continue
        label = f"ours {spec.describe()}" + (" (default)" if spec.is_default else "")
        if spec.precision == "fp32" and not spec.channels_last and same_math_as:
            label += " (same math as reference fp32)"
        configs.append(Config(label, lambda spec=spec: ours_step_fn(spec.build(), spec.args, batch), b,
                              dict(kind="ours", precision=spec.precision, layout=spec.layout,
                                   compiled=spec.compile, default=spec.is_default), compile=spec.compile))
        seen[key] = configs[-1]
    return configs


def report_compute(args, b, configs, rates, ref_labels):
    """Each configuration's img/s (and peak memory), then the speed-ups against each reference."""
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


# ----------------------------------------------------------------------------
# e2e
# ----------------------------------------------------------------------------

def section_e2e(args, device, memory, root):
    workers = launch_lib.default_workers(1)[0] if args.workers is None else args.workers
    b = args.batch_size
    out(f"== e2e: {args.model} {args.image_size}, batch {b}, real JPEGs from {root} with {workers} "
        f"DataLoader worker(s) vs synthetic, 1 process, {device.describe()} ==")
    spec = OursSpec(device, args, b)
    synthetic, real, loader_alone = e2e_ours(args, device, root, spec, workers)
    memory.release()
    pin = device.is_accelerator
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
    reference = e2e_reference(args, device, root, workers, common) if args.references else None
    memory.release()
    e2e_verdict(synthetic, real, loader_alone, reference, workers, b)


def e2e_ours(args, device, root, spec, workers):
    """Ours on synthetic data, the loader alone, ours on the JPEGs through that loader: ([img/s] x 3)."""
    b, pin = args.batch_size, device.is_accelerator
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
    return synthetic, real, loader_alone


def e2e_reference(args, device, root, workers, common):
    """The reference loop on the JPEGs through torchvision's float pipeline; [img/s]."""
    b, pin = args.batch_size, device.is_accelerator
    amp_dtype = reference_amp_dtype(args, device) if "amp" in args.references else torch.float32
    dataset = reference_pipeline_dataset(root, args.image_size)
    ref_loader = torch.utils.data.DataLoader(
        dataset, batch_size=b, sampler=CyclingSampler(len(dataset), args.seed, keys=False), num_workers=workers,
        pin_memory=pin, drop_last=True, persistent_workers=workers > 0)
    step = reference_step_fn(device, args.model, loader=ref_loader, amp_dtype=amp_dtype, seed=args.seed)
    reference = time_windows(step, b, device, max(args.warmup, 2 * workers + 1), args.steps, args.windows)
    what = f"reference loop {dtype_name(amp_dtype)}, real JPEGs (torchvision pipeline)"
    out(f"  {what:<56} {fmt_rates(reference)}")
    record(f"e2e: {what}", "e2e", reference, kind="reference", data="real", precision=dtype_name(amp_dtype),
           layout="NCHW", **common)
    return reference


def e2e_verdict(synthetic, real, loader_alone, reference, workers, b):
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
    lifecycle.guard_streams()  # `| head`: a closed stdout is one warning, not a traceback; files still written
    main()
