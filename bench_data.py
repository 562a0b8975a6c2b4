"""The benchmark's data: ImageNet-like JPEGs to time on (make_imagenet_like_jpegs), the reference input pipeline
(torchvision's), the sampler the e2e section reads with (CyclingSampler), and the pipeline section (images/s per
CPU core, with the reduced-size JPEG decoding note). See benchmark.py's docstring."""
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time

import torch

import data as data_lib
import decode
import device as device_lib
from bench_core import fmt_rates, interleaved, out, record


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
    shares = ", ".join(f"{size}px: {100 * share:.1f}%" for size, share in reduced_crop_shares(args.image_size))
    out(f"  reduced-size JPEG decoding applies to this share of crops of a 500x375 image: {shares}")
    cost = decode_costs(root)
    out(f"  PIL decode per file: full {cost[1]:.2f} ms, 1/2 scale {cost[2]:.2f} ms, 1/4 scale {cost[4]:.2f} ms")
    rates = big_photo_rates(args.image_size, args.seed)
    out(f"  1600x1200 photos, {args.image_size} crops, fast path: reduced decode off {rates[False]:.1f} img/s, "
        f"on {rates[True]:.1f} img/s ({rates[True] / rates[False]:.2f}x)")


def reduced_crop_shares(image_size, h=375, w=500, draws=2000):
    """[(output size, share of RandomResizedCrop's crops of an h x w JPEG that decode at 1/2 scale or less)]."""
    from torchvision import transforms
    crop = decode.FastRandomResizedCrop(image_size)
    header = type("Header", (), {"format": "JPEG", "mode": "RGB"})()
    shares = []
    for out_size in sorted({128, 176, image_size}):
        crop.size = (out_size, out_size)
        hits = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for _ in range(draws):
                _, _, ch, cw = transforms.RandomResizedCrop.get_params(
                    torch.empty(1, 1, 1).expand(3, h, w), (0.08, 1.0), (3 / 4, 4 / 3))
                hits += crop.reduction(ch, cw, header) > 1
        shares.append((out_size, hits / draws))
    return shares


def decode_costs(root, files=50):
    """{scale: ms per file} of PIL decoding the first `files` JPEGs under root at full, 1/2 and 1/4 scale."""
    from PIL import Image
    paths = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs][:files]
    blobs = [open(f, "rb").read() for f in paths]

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
    return cost


def big_photo_rates(image_size, seed):
    """{reduced decode on: img/s} of ours' fast path on big photos (1600x1200, as from a phone or OpenImages),
    where reduced decoding does apply: one warm pass, then two timed ones."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    rates = {}
    with tempfile.TemporaryDirectory(prefix="benchmark_big_") as big:
        os.makedirs(os.path.join(big, "c"))
        for k, a in enumerate(load_sample_images().images * 10):
            Image.fromarray(a).transpose(Image.FLIP_LEFT_RIGHT if k % 4 >= 2 else Image.NONE).resize(
                (1600, 1200), Image.BICUBIC).save(os.path.join(big, "c", f"{k}.jpg"), quality=90)
        for reduce in (False, True):
            ds = data_lib.train_dataset(big, image_size, fast_decode=True, seed=seed)
            ds.transform.transforms[0].reduced_decode = reduce  # the decode.FastRandomResizedCrop
            with torch_threads(1):
                passes = [ds[(e, i, 0)] for e in range(1) for i in range(len(ds))]  # warm
                start = time.perf_counter()
                for e in range(1, 3):
                    passes = [ds[(e, i, 0)] for i in range(len(ds))]
                rates[reduce] = 2 * len(ds) / (time.perf_counter() - start)
        del passes
    return rates


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


