"""Throughput benchmark: the plain reference loop against this repo's defaults, in one process, same inputs.

    python benchmark.py                                     # every section (~8 min on 2 CPU cores)
    python benchmark.py --sections compute                  # DenseNet-201 224 batch 16, synthetic
    python benchmark.py --sections pipeline,e2e --data-dir /data/imagenet/train
    python benchmark.py --sections scaling --scaling-batches 8,16 --scaling-sizes 160,224 --scaling-procs 1,2

Sections (img/s is always the MEDIAN of --windows timed windows of --steps steps, after --warmup steps;
the device is synchronised at each window's ends):
  compute   training step on synthetic data. reference = torchvision's densenet201, fp32, NCHW, eager,
            float inputs, torch.optim.SGD, loss.item() every step (as torchvision's reference script);
            ours = densenet.py's model, channels_last (cpu/cuda), --amp autocast (bf16 on AVX512-BF16/AMX CPUs
            and bf16 GPUs, fp16 on NPU), uint8 input normalised on the device, build_sgd, set_to_none, no host
            sync in the step. --compile adds ours + torch.compile (compile time printed separately).
  pipeline  input pipeline alone, one process, one thread: images/s per CPU core on ImageNet-sized JPEGs
            (~500x375, generated from scikit-learn's two sample photos unless --data-dir). reference =
            torchvision ImageFolder + PIL + RandomResizedCrop + flip + ToTensor + Normalize + default_collate;
            ours = data.ImageFolderDataset + data.train_transform(fast_decode=True) + collate_skip_bad +
            DeviceNormalize (counted here because on a CPU the "device" normalisation costs this core too).
  e2e       whole training step on those JPEGs from disk through the DataLoader (--workers, default
            data.default_workers) vs the same step on synthetic data, one process.
  scaling   ours only: batch size, resolution, and 1 vs 2 processes (DDP, gloo on CPU) at the same global batch.
"""
import argparse
import contextlib
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)

import data as data_lib  # noqa: E402
import densenet  # noqa: E402
import main as main_lib  # noqa: E402
from device import build_mixed_precision, build_sgd, resolve_device  # noqa: E402

SECTIONS = ("compute", "pipeline", "e2e", "scaling")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    a = p.add_argument
    a("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    a("--device", default="auto", choices=["auto", "npu", "cuda", "cpu"])
    a("--model", default="densenet201", choices=sorted(densenet.MODELS))
    a("-b", "--batch-size", type=int, default=16)
    a("--image-size", type=int, default=224)
    a("--steps", type=int, default=2, help="training steps per timed window")
    a("--windows", type=int, default=3, help="timed windows; the median is reported")
    a("--warmup", type=int, default=1, help="untimed steps before the windows (allocator, oneDNN/cuDNN caches)")
    a("--compile", action="store_true", help="also time ours + torch.compile (compute section)")
    a("--no-reference", action="store_true", help="skip the reference loop in compute/e2e (it is the slow one)")
    a("--images", type=int, default=200, help="JPEGs to generate for pipeline/e2e (pipeline: files per pass)")
    a("--data-dir", default=None, help="use this class-folder tree of real images instead of generating")
    a("--workers", type=int, default=None, help="e2e DataLoader workers (default: data.default_workers(1))")
    a("--pipeline-passes", type=int, default=5, help="timed passes over the images in the pipeline section")
    a("--scaling-batches", default="8,16,32")
    a("--scaling-sizes", default="112,160,224")
    a("--scaling-procs", default="1,2")
    a("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    return args


def ints(text):
    return [int(x) for x in str(text).split(",") if x.strip()]


def out(text=""):
    print(text, flush=True)


# ----------------------------------------------------------------------------
# Timing
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


# ----------------------------------------------------------------------------
# The two training steps
# ----------------------------------------------------------------------------

def reference_step_fn(device, model_name, batch_size, num_classes=1000, images=None, targets=None, loader=None,
                      seed=0):
    """torchvision's DenseNet, fp32, NCHW, eager: the loop a plain PyTorch script runs."""
    import torchvision
    torch.manual_seed(seed)
    dev = device.torch_device
    model = getattr(torchvision.models, model_name)(num_classes=num_classes).to(dev).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    batches = iter(loader) if loader is not None else None

    def step():
        if batches is not None:
            x, y = next(batches)
            x, y = x.to(dev), y.to(dev)
        else:
            x, y = images, targets
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # the reference logs the loss every step
    return step


class Ours:
    """This repo's training step, from main.py's own building blocks, at the device's default settings."""

    def __init__(self, device, model_name, batch_size, num_classes=1000, compile=False, amp=True,
                 channels_last=None, seed=0):
        torch.manual_seed(seed)
        argv = ["--synthetic", "--device", device.type] + (["--amp"] if amp else [])
        self.args = main_lib.get_args_parser().parse_args(argv)
        self.device = device
        dev = device.torch_device
        self.channels_last = device.type in ("cuda", "cpu") if channels_last is None else channels_last
        model = densenet.build_model(model_name, num_classes=num_classes).to(dev)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.amp = build_mixed_precision(self.args, device)
        self.optimizer = build_sgd(main_lib.param_groups(model, 1e-4, 0.0), 0.1, 0.9, device)
        model, self.optimizer = self.amp.initialize(model, self.optimizer)
        self.model_without_ddp = model
        self.model = model
        self.compile = compile
        self.normalize = data_lib.DeviceNormalize(dev, self.channels_last)
        self.criterion = nn.CrossEntropyLoss()
        self.sums = torch.zeros(4, dtype=torch.float64, device=dev)

    def wrap_ddp(self):
        self.model = nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.is_accelerator else None)

    def finish_setup(self):
        if self.compile:
            self.model = torch.compile(self.model)

    def describe(self):
        precision = "fp32" if self.amp.backend == "off" else \
            f"{self.amp.backend} autocast {str(self.amp.dtype).replace('torch.', '')}"
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{layout}, {precision}" + (", compiled" if self.compile else "")

    def step_fn(self, batch=None, loader=None):
        """One step exactly as main.train_one_epoch does it (minus logging), on a fixed batch or a loader."""
        dev = self.device.torch_device
        batches = iter(loader) if loader is not None else None

        def step():
            b = next(batches) if batches is not None else batch
            images = self.normalize(b.images)
            targets = b.targets.to(dev, non_blocking=True)
            with self.amp.autocast():
                output = self.model(images)
                loss = self.criterion(output, targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.amp.backward_and_step(loss, self.optimizer, self.model.parameters())
            n = len(b.targets)
            counts = main_lib.utils.accuracy_counts(output.detach(), targets)
            self.sums += torch.stack([loss.detach().double() * n, counts[0].double(), counts[1].double(),
                                      torch.full((), n, dtype=torch.float64, device=dev)])
        return step


def synthetic_batch(batch_size, size, num_classes=1000, seed=0):
    return data_lib.SyntheticLoader(batch_size, size, num_classes, 1, seed).batch


# ----------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------

def section_compute(args, device):
    out(f"== compute: {args.model} {args.image_size}x{args.image_size}, batch {args.batch_size}, synthetic, "
        f"{device.describe()} ==")
    batch = synthetic_batch(args.batch_size, args.image_size, seed=args.seed)
    configs = []
    if not args.no_reference:
        x = data_lib.DeviceNormalize(device.torch_device, False)(batch.images)  # same pixels, float NCHW
        step = reference_step_fn(device, args.model, args.batch_size, images=x,
                                 targets=batch.targets.to(device.torch_device))
        configs.append((f"reference (torchvision {args.model}, fp32, NCHW, eager)", step, args.batch_size))
    variants = [("ours, fp32 NCHW (same math as reference)", dict(amp=False, channels_last=False)),
                ("ours, fp32 channels_last", dict(amp=False))] if not args.no_reference else []
    variants.append(("ours (default: {})", {}))
    if args.compile:
        variants.append(("ours + torch.compile ({})", dict(compile=True)))
    for label, kw in variants:
        ours = Ours(device, args.model, args.batch_size, seed=args.seed, **kw)
        label = label.format(ours.describe())
        ours.finish_setup()
        step = ours.step_fn(batch)
        if ours.compile:
            start = time.perf_counter()
            step()
            device.synchronize()
            out(f"  (torch.compile: first step took {time.perf_counter() - start:.1f} s, excluded)")
        configs.append((label, step, args.batch_size))
    results = interleaved(configs, device, args.warmup, args.steps, args.windows)
    for label, rates in results.items():
        out(f"  {label:<59} {fmt_rates(rates)}")
    if not args.no_reference:
        ref = statistics.median(results[configs[0][0]])
        for label, rates in list(results.items())[1:]:
            out(f"  speed-up {label:<50} {statistics.median(rates) / ref:6.2f}x")
    return results


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
    cpu = resolve_device("cpu")
    normalize = data_lib.DeviceNormalize(cpu.torch_device, True)
    ref = reference_pipeline_dataset(root, args.image_size)
    fast = data_lib.ImageFolderDataset(root, data_lib.train_transform(args.image_size, fast_decode=True), args.seed)
    pil = data_lib.ImageFolderDataset(root, data_lib.train_transform(args.image_size), args.seed)
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
    for label, rates in results.items():
        out(f"  {label:<52} {fmt_rates(rates)}")
    ref_rate = statistics.median(results[configs[0][0]])
    for label, rates in list(results.items())[1:]:
        out(f"  vs reference: {label:<46} {statistics.median(rates) / ref_rate:6.2f}x")
    reduced_decode_note(args, root)
    return results


def reduced_decode_note(args, root):
    """How often RandomResizedCrop leaves room for libjpeg's 1/2-1/8 decoding, and what it buys."""
    import io
    from PIL import Image
    crop = data_lib.FastRandomResizedCrop(args.image_size)
    rows = []
    header = type("Header", (), {"format": "JPEG", "mode": "RGB"})()
    h, w = 375, 500
    for out_size in sorted({128, 176, args.image_size}):
        crop.size = (out_size, out_size)
        hits = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for _ in range(2000):
                _, _, ch, cw = data_lib.transforms.RandomResizedCrop.get_params(
                    torch.empty(1, 1, 1).expand(3, h, w), (0.08, 1.0), (3 / 4, 4 / 3))
                hits += crop.reduction(ch, cw, header) > 1
        rows.append(f"{out_size}px: {100 * hits / 2000:.1f}%")
    out(f"  reduced-size JPEG decoding applies to this share of crops of a 500x375 image: {', '.join(rows)}")
    # decode cost at full vs reduced scale on the same files
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs][:50]
    blobs = [open(f, "rb").read() for f in files]

    def decode(scale):
        for b in blobs:
            with Image.open(io.BytesIO(b)) as img:
                if scale > 1:
                    img.draft("RGB", (img.size[0] // scale, img.size[1] // scale))
                img.load()
    cost = {}
    with torch_threads(1):
        for scale in (1, 2, 4):
            decode(scale)
            start = time.perf_counter()
            decode(scale)
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
            tf = data_lib.train_transform(args.image_size, fast_decode=True)
            tf.transforms[0].reduced_decode = reduce
            ds = data_lib.ImageFolderDataset(big, tf, args.seed)
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


def section_e2e(args, device, root):
    workers = data_lib.default_workers(1) if args.workers is None else args.workers
    out(f"== e2e: {args.model} {args.image_size}, batch {args.batch_size}, real JPEGs from {root} with {workers} "
        f"DataLoader worker(s) vs synthetic, 1 process, {device.describe()} ==")
    pin = device.is_accelerator
    results = {}
    ours = Ours(device, args.model, args.batch_size, seed=args.seed)
    ours.finish_setup()
    synthetic_step = ours.step_fn(synthetic_batch(args.batch_size, args.image_size, seed=args.seed))
    # Synthetic windows before and after the real-data ones, so a drift in outside load shows in both.
    results["ours synthetic"] = time_windows(synthetic_step, args.batch_size, device, args.warmup, args.steps,
                                             args.windows)
    train = data_lib.ImageFolderDataset(root, data_lib.train_transform(args.image_size, fast_decode=True), args.seed)
    sampler = data_lib.ResumableDistributedSampler(len(train), 1, 0, args.seed)
    loader = data_lib.make_loader(train, sampler, args.batch_size, workers, pin, args.seed, drop_last=True)
    step = ours.step_fn(loader=Forever(loader))
    # Not interleaved with the synthetic windows: the worker would refill its prefetch queue meanwhile and
    # hide a data bottleneck. Warm up past the queue's depth instead, so the windows see the steady state.
    rates = time_windows(step, args.batch_size, device, max(args.warmup, 4 * workers + 1), args.steps,
                         args.windows)
    results["ours real"] = rates
    del step, loader
    results["ours synthetic"] += time_windows(synthetic_step, args.batch_size, device, 0, args.steps, args.windows)
    out(f"  {'ours, synthetic data (windows before + after)':<52} {fmt_rates(results['ours synthetic'])}")
    out(f"  {'ours, real JPEGs (fast decode)':<52} {fmt_rates(rates)}")
    del synthetic_step, ours
    if not args.no_reference:
        ref_set = reference_pipeline_dataset(root, args.image_size)
        ref_loader = torch.utils.data.DataLoader(ref_set, batch_size=args.batch_size, shuffle=True,
                                                 num_workers=workers, pin_memory=pin, drop_last=True,
                                                 persistent_workers=workers > 0)
        step = reference_step_fn(device, args.model, args.batch_size, loader=Forever(ref_loader))
        rates = time_windows(step, args.batch_size, device, max(args.warmup, 2 * workers + 1), args.steps,
                             args.windows)
        results["reference real"] = rates
        out(f"  {'reference loop, real JPEGs (torchvision pipeline)':<52} {fmt_rates(rates)}")
        del step, ref_loader
    synth, real = statistics.median(results["ours synthetic"]), statistics.median(results["ours real"])
    out(f"  ours real / ours synthetic: {real / synth:.2f}  ({100 * (1 - real / synth):+.1f}% slower)")
    if "reference real" in results:
        out(f"  ours real / reference real: {real / statistics.median(results['reference real']):.2f}x")
    return results


def _scaling_worker(rank, world, port, args, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    device = resolve_device(args.device, rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.parent_threads // world))  # the same cores, split between ranks
    import torch.distributed as dist
    dist.init_process_group(device.dist_backend, rank=rank, world_size=world)
    local = args.batch_size // world
    ours = Ours(device, args.model, local, seed=args.seed)
    ours.wrap_ddp()
    step = ours.step_fn(synthetic_batch(local, args.image_size, seed=args.seed + rank))
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
    if rank == 0:
        with open(result_path, "w") as f:
            f.write(",".join(str(r) for r in rates))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def section_scaling(args, device):
    out(f"== scaling: ours, {args.model}, synthetic, {device.describe()} ==")
    results = {}
    groups = [(f"batch size (at {args.image_size}px)", [(f"batch {b:<4}", b, args.image_size)
                                                         for b in ints(args.scaling_batches)]),
              (f"resolution (batch {args.batch_size})", [(f"{r}px    ", args.batch_size, r)
                                                       for r in ints(args.scaling_sizes)])]
    for title, cases in groups:
        out(f"  {title}:")
        configs = []
        for label, b, size in cases:
            ours = Ours(device, args.model, b, seed=args.seed)
            configs.append((label, ours.step_fn(synthetic_batch(b, size, seed=args.seed)), b))
        for label, rates in interleaved(configs, device, args.warmup, args.steps, args.windows).items():
            results[(title, label)] = rates
            out(f"    {label} {fmt_rates(rates)}")
        del configs, ours
    out(f"  processes (global batch {args.batch_size}, {args.image_size}px; DDP, {device.dist_backend}; "
        f"CPU threads split between processes):")
    import torch.multiprocessing as mp
    args.parent_threads = torch.get_num_threads()
    for world in ints(args.scaling_procs):
        if args.batch_size % world:
            out(f"    {world} processes: skipped (batch {args.batch_size} does not divide)")
            continue
        if device.is_accelerator and device.module().device_count() < world:
            out(f"    {world} processes: skipped (only {device.module().device_count()} {device.type} devices)")
            continue
        with tempfile.NamedTemporaryFile(suffix=".txt", delete=False) as f:
            path = f.name
        mp.spawn(_scaling_worker, args=(world, free_port(), args, path), nprocs=world, join=True)
        with open(path) as f:
            rates = [float(x) for x in f.read().split(",")]
        os.unlink(path)
        results[("procs", world)] = rates
        out(f"    {world} process{'es' if world > 1 else '  '} {fmt_rates(rates)}  (global)")
    return results


def main(argv=None):
    args = get_args(argv)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    device = resolve_device(args.device)
    out(f"benchmark: torch {torch.__version__}, {device.describe()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}; median of {args.windows} windows x {args.steps} steps "
        f"after {args.warmup} warm-up steps")
    tmp = None
    root = args.data_dir
    if root is None and ({"pipeline", "e2e"} & set(args.sections)):
        tmp = tempfile.TemporaryDirectory(prefix="benchmark_jpegs_")
        root = make_imagenet_like_jpegs(tmp.name, args.images, args.seed)
    t0 = time.perf_counter()
    try:
        for section in args.sections:
            start = time.perf_counter()
            if section == "compute":
                section_compute(args, device)
            elif section == "pipeline":
                section_pipeline(args, root)
            elif section == "e2e":
                section_e2e(args, device, root)
            elif section == "scaling":
                section_scaling(args, device)
            out(f"  ({section}: {time.perf_counter() - start:.0f} s)")
    finally:
        if tmp is not None:
            tmp.cleanup()
    out(f"total {time.perf_counter() - t0:.0f} s; load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
