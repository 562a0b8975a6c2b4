"""Input pipeline: ImageNet-layout folders -> uint8 batches -> normalised tensors on the device.

Design choices (why, not what):
  * Workers decode and crop with PIL and hand over **uint8** tensors: 4x less
    data through shared memory and pinned host memory than float32, and the
    float conversion + normalisation run on the device, in the model's memory
    format, where they are nearly free. The arithmetic is the same as
    torchvision's ToTensor/ConvertImageDtype + Normalize, so evaluation tensors
    are bit-identical to torchvision's ImageNet eval preset.
  * A file that cannot be decoded does not kill a multi-day run: the dataset
    returns None for it and the collate function drops it and reports its path,
    so the trainer can warn, count and enforce --max-bad-images.
  * Augmentation randomness is derived from (seed, epoch, sample index) rather
    than from whichever worker happens to load the sample, so a run resumed
    mid-epoch, or run with a different --workers, sees the same crops.
  * Validation is sharded without padding (ExactEvalSampler): every image is
    evaluated exactly once, however many ranks.
"""
import math
import os
import signal

import torch
import torch.utils.data
from PIL import Image, ImageFile
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                  "nearest": InterpolationMode.NEAREST}

# A truncated JPEG must be an error we can catch and report, never a silently half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DataError(ValueError):
    """A dataset problem the user must fix (one-line message)."""


# ----------------------------------------------------------------------------
# Layout checks: fail before any model is built
# ----------------------------------------------------------------------------

def _is_hidden(name):
    return name.startswith(".") or name in ("Thumbs.db", "desktop.ini", "__MACOSX")


def list_classes(folder):
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not _is_hidden(e.name))


def is_image_file(path):
    name = os.path.basename(path)
    return not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def check_dataset_layout(root):
    """Return the class names of an ImageNet-layout folder, or raise DataError saying what is wrong."""
    if not root:
        raise DataError("no dataset given: pass --data-path /path/to/imagenet (a folder with train/ and val/)")
    if not os.path.isdir(root):
        raise DataError(f"--data-path {root}: no such directory")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise DataError(f"--data-path {root}: missing '{split}/' folder (expected {root}/{split}/<class>/<image>)")
    train_classes = list_classes(os.path.join(root, "train"))
    val_classes = list_classes(os.path.join(root, "val"))
    if not train_classes:
        raise DataError(f"{root}/train has no class folders (expected train/<class>/<image>)")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))[:5]
        only_val = sorted(set(val_classes) - set(train_classes))[:5]
        raise DataError(f"val classes differ from train classes ({len(val_classes)} vs {len(train_classes)}; "
                        f"only in train: {only_train}, only in val: {only_val})")
    return train_classes


# ----------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------

def load_rgb(path):
    """Decode any image PIL can read into RGB (grayscale, CMYK, palette and RGBA included)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode == "RGBA" or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency onto white, as a viewer would, instead of keeping undefined colours.
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


class ImageFolderDataset(datasets.ImageFolder):
    """torchvision's ImageFolder that skips hidden files, reports undecodable ones, and reseeds per sample."""

    def __init__(self, root, transform, seed=0):
        super().__init__(root, transform=transform, loader=getattr(transform, "loader", load_rgb),
                         is_valid_file=is_image_file, allow_empty=True)  # fast decode: reads, decodes later
        self.seed = seed
        if not self.samples:
            raise DataError(f"{root} contains no image files ({', '.join(IMAGE_EXTENSIONS)})")

    def find_classes(self, directory):
        # Same class list as check_dataset_layout: a hidden folder (.ipynb_checkpoints, __MACOSX) is no class
        # and must not shift every label by one.
        classes = list_classes(directory)
        return classes, {name: i for i, name in enumerate(classes)}

    def __getitem__(self, key):
        # The training sampler yields (epoch, index): persistent workers hold their own copy of the
        # dataset, so the epoch must travel with each request to reseed augmentation correctly.
        epoch, index, repeat = key if isinstance(key, tuple) else (0, key, 0)
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except Exception as e:  # truncated, zero-byte, not an image: report, don't crash
            return BadSample(path, f"{type(e).__name__}: {e}")
        if torch.utils.data.get_worker_info() is None:
            # In the main process: don't disturb the trainer's own RNG stream.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(self._sample_seed(epoch, index, repeat))
                return self._transform(image, path, target)
        # The CPU generator only: torch.manual_seed also queues a CUDA reseed with a stack trace (~1 ms)
        torch.default_generator.manual_seed(self._sample_seed(epoch, index, repeat))
        return self._transform(image, path, target)

    def _transform(self, image, path, target):
        try:
            return self.transform(image), target
        except UnreadableImage as e:  # the fast path decodes here, after the crop is drawn
            return BadSample(path, str(e))

    def _sample_seed(self, epoch, index, repeat=0):
        # torch's CPU generator keeps only 32 bits of a seed, so mix (seed, epoch, repeat, index) through
        # splitmix64 and fold: neighbouring keys must not share their low bits.
        x = (((self.seed * 1000 + epoch) * 16 + repeat) << 32) + index
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
        return (x ^ (x >> 32)) & 0xFFFFFFFF


class BadSample:
    """Placeholder for an unreadable file; dropped by collate and reported by the trainer."""

    def __init__(self, path, reason):
        self.path, self.reason = path, reason


class Batch:
    """uint8 images, targets, and the files in this batch that could not be read."""

    def __init__(self, images, targets, bad):
        self.images, self.targets, self.bad = images, targets, bad

    def pin_memory(self):
        self.images = self.images.pin_memory()
        self.targets = self.targets.pin_memory()
        return self


def collate_skip_bad(samples):
    good = [s for s in samples if not isinstance(s, BadSample)]
    bad = [(s.path, s.reason) for s in samples if isinstance(s, BadSample)]
    if good:
        images = torch.stack([s[0] for s in good])
        targets = torch.tensor([s[1] for s in good], dtype=torch.int64)
    else:
        images = torch.empty(0, dtype=torch.uint8)
        targets = torch.empty(0, dtype=torch.int64)
    return Batch(images, targets, bad)


# ----------------------------------------------------------------------------
# Transforms (workers: PIL -> uint8 CHW; device: float, normalise)
# ----------------------------------------------------------------------------

def train_transform(crop_size, interpolation="bilinear", scale=(0.08, 1.0), hflip_prob=0.5, auto_augment=None,
                    ra_magnitude=9, augmix_severity=3, random_erase=0.0, fast_decode=False):
    import recipe  # the stronger augmentations of the recipe options

    if fast_decode and not auto_augment and interpolation in FAST_DECODE_INTERPOLATIONS:
        steps = [FastRandomResizedCrop(crop_size, scale, interpolation=interpolation, hflip_prob=hflip_prob)]
        if random_erase > 0:
            steps.append(recipe.random_erasing(random_erase))
        fast = transforms.Compose(steps)
        fast.loader = load_encoded  # ImageFolderDataset reads files with this: decoding waits for the crop
        return fast

    steps = [transforms.RandomResizedCrop(crop_size, scale=tuple(scale), interpolation=INTERPOLATIONS[interpolation],
                                          antialias=True)]
    if hflip_prob > 0:
        steps.append(transforms.RandomHorizontalFlip(hflip_prob))
    if auto_augment:
        steps.append(recipe.auto_augment_transform(auto_augment, INTERPOLATIONS[interpolation], ra_magnitude,
                                                   augmix_severity))
    steps.append(transforms.PILToTensor())
    if random_erase > 0:
        steps.append(recipe.random_erasing(random_erase))
    return transforms.Compose(steps)


def eval_transform(resize_size, crop_size, interpolation="bilinear"):
    return transforms.Compose([
        transforms.Resize(resize_size, interpolation=INTERPOLATIONS[interpolation], antialias=True),
        transforms.CenterCrop(crop_size),
        transforms.PILToTensor(),
    ])


# ----------------------------------------------------------------------------
# Fast training decode (main.py --fast-decode, the default): the same crops and flips as
# train_transform, about twice the images per core. The crop is drawn from the JPEG header's size
# (same RNG draws as torchvision's RandomResizedCrop + RandomHorizontalFlip), then the file is decoded
# by libjpeg-turbo straight into a uint8 tensor (torchvision.io.decode_jpeg: identical pixels to PIL,
# ~1.5x faster) and cropped/resized by torch's vectorised uint8 antialiased resize (~2x faster than
# PIL's; within 2 grey levels of PIL's, mean difference ~0.02). When the crop is at least 2x the output
# size, libjpeg decodes at 1/2, 1/4 or 1/8 scale (PIL's draft): it pays on big photos (benchmark.py
# measures it), but never applies to ImageNet-sized (~500x375) images at 224. PNG, CMYK, ... take the PIL path.
# ----------------------------------------------------------------------------

FAST_DECODE_INTERPOLATIONS = ("bilinear",)
PIL_FILTERS = {InterpolationMode.BILINEAR: Image.BILINEAR, InterpolationMode.BICUBIC: Image.BICUBIC,
               InterpolationMode.NEAREST: Image.NEAREST}

try:
    import warnings as _warnings
    from torchvision.io import ImageReadMode as _ImageReadMode, decode_jpeg as _decode_jpeg
    # torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work, so don't warn per worker.
    _warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision are deprecated")
except ImportError:  # a torchvision without decoders: PIL decodes, the crop/resize stays fast
    _decode_jpeg = None


class UnreadableImage(Exception):
    """A file whose header parsed but whose pixels did not decode (e.g. truncated): reported, skipped."""


def _jpeg_header(data):
    """(mode, (width, height)) from a baseline/progressive JPEG's SOF segment, or None (let PIL look)."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, n = 2, len(data)
    while pos + 9 < n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            height, width, comps = int.from_bytes(data[pos + 5:pos + 7], "big"), \
                int.from_bytes(data[pos + 7:pos + 9], "big"), data[pos + 9]
            return ({1: "L", 3: "RGB", 4: "CMYK"}.get(comps, "?"), (width, height)) if width and height else None
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


class EncodedImage:
    """A training file read but not decoded: its bytes and its header's format, mode and size."""

    def __init__(self, path):
        import io
        self.path = path
        with open(path, "rb") as f:
            self.data = bytearray(f.read())
        header = _jpeg_header(self.data)  # ~20 us; PIL's Image.open costs ~10x that
        if header is not None:
            self.format, (self.mode, self.size) = "JPEG", header
            return
        with Image.open(io.BytesIO(self.data)) as img:  # header only; raises for what is not an image
            self.format, self.mode, self.size = img.format, img.mode, img.size


def load_encoded(path):
    return EncodedImage(path)


class FastRandomResizedCrop:
    """RandomResizedCrop + RandomHorizontalFlip + PILToTensor, deciding the crop before decoding.

    `reduced_decode`: let libjpeg decode at 1/2..1/8 scale when the crop stays >= the output size, then
    resize the same (fractional) box with PIL. The DCT-domain downscale stands in for part of the
    antialiasing filter: the same picture (mean difference < 1 grey level on photos), not the same bits.
    """

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), interpolation="bilinear",
                 hflip_prob=0.5, reduced_decode=True):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interpolation = INTERPOLATIONS[interpolation] if isinstance(interpolation, str) else interpolation
        self.hflip_prob = hflip_prob
        self.reduced_decode = reduced_decode

    def reduction(self, crop_h, crop_w, image):
        """The DCT scale denominator (1, 2, 4 or 8) that keeps the crop at least the output size."""
        r = 1
        if self.reduced_decode and image.format == "JPEG" and image.mode in ("RGB", "L"):
            while r < 8 and crop_h >= 2 * r * self.size[0] and crop_w >= 2 * r * self.size[1]:
                r *= 2
        return r

    def __call__(self, image):
        import numpy as np
        from torchvision.transforms.v2 import functional as F2

        width, height = image.size
        # The same draws, in the same order, as RandomResizedCrop then RandomHorizontalFlip.
        i, j, h, w = transforms.RandomResizedCrop.get_params(torch.empty(1, 1, 1).expand(3, height, width),
                                                             self.scale, self.ratio)
        flip = self.hflip_prob > 0 and bool(torch.rand(1) < self.hflip_prob)
        r = self.reduction(h, w, image) if isinstance(image, EncodedImage) else 1
        try:
            if isinstance(image, Image.Image):
                pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
            elif (r == 1 and _decode_jpeg is not None and image.format == "JPEG" and image.mode in ("RGB", "L")
                  and image.data.rfind(b"\xff\xd9", len(image.data) - 64) >= 0):  # no end marker: let PIL judge
                pixels = _decode_jpeg(torch.frombuffer(image.data, dtype=torch.uint8), mode=_ImageReadMode.RGB)
            elif r > 1:  # decode at 1/r scale (pixel k covers original pixels [k*r, (k+1)*r)), resize the box
                import io
                with Image.open(io.BytesIO(image.data)) as img:
                    img.draft("RGB", (width // r, height // r))
                    img = img.convert("RGB").resize(self.size[::-1], PIL_FILTERS[self.interpolation],
                                                    box=(j / r, i / r, (j + w) / r, (i + h) / r))
                out = torch.from_numpy(np.array(img)).permute(2, 0, 1)
                return (out.flip(-1) if flip else out).contiguous()
            else:
                pixels = torch.from_numpy(np.array(load_rgb(image.path))).permute(2, 0, 1)
        except (OSError, RuntimeError, ValueError, SyntaxError) as e:
            raise UnreadableImage(f"{type(e).__name__}: {e}") from None
        out = F2.resized_crop(pixels, i, j, h, w, list(self.size), self.interpolation, antialias=True)
        return (out.flip(-1) if flip else out).contiguous()


class DeviceNormalize:
    """uint8 NCHW batch on the host -> normalised float batch on the device, in the model's memory format.

    Same operations, in the same order and dtype, as ConvertImageDtype (x / 255) then Normalize
    ((x - mean) / std), so results match torchvision's CPU preprocessing bit for bit.
    """

    def __init__(self, device, channels_last=False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, images_uint8):
        x = images_uint8.to(self.device, non_blocking=True)
        x = x.contiguous(memory_format=self.memory_format).float()
        x = x / 255.0
        return x.sub_(self.mean).div_(self.std)


# ----------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------

class ResumableDistributedSampler(torch.utils.data.Sampler):
    """Shuffled shard of the training set for one rank, able to start mid-epoch.

    Like DistributedSampler (a fresh permutation per epoch from seed + epoch, padded
    so every rank gets the same number of samples), plus `start_index` so that a
    run resumed after preemption skips exactly the samples it has already seen.

    `repeats` > 1 is repeated augmentation (--ra-sampler, as in DeiT/torchvision):
    each image appears `repeats` times in a row of the global order, so its copies
    land on different ranks with different augmentations; the epoch length stays
    that of one pass over the data.
    Yields (epoch, index, repeat) keys, which ImageFolderDataset turns into seeds.
    """

    def __init__(self, dataset_size, num_replicas=1, rank=0, seed=0, shuffle=True, repeats=1):
        self.dataset_size = dataset_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.repeats = repeats
        self.epoch = 0
        self.start_index = 0
        self.num_samples = math.ceil(dataset_size / num_replicas)

    def set_epoch(self, epoch, start_index=0):
        self.epoch = epoch
        self.start_index = start_index

    def _rank_indices(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=g).tolist()
        else:
            order = list(range(self.dataset_size))
        order = [(i, r) for i in order for r in range(self.repeats)]
        total = self.num_samples * self.num_replicas
        if len(order) < total:
            order += order[: total - len(order)]  # pad by wrapping, as DistributedSampler does
        return order[self.rank:total:self.num_replicas]

    def __iter__(self):
        return iter((self.epoch, i, r) for i, r in self._rank_indices()[self.start_index:])

    def __len__(self):
        return self.num_samples - self.start_index


class ExactEvalSampler(torch.utils.data.Sampler):
    """Rank r evaluates images r, r+W, r+2W, ...: no padding, no drops, each image exactly once."""

    def __init__(self, dataset_size, num_replicas=1, rank=0):
        self.indices = list(range(rank, dataset_size, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# ----------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------

def default_workers(world_size=1):
    """Share the machine's cores among the ranks on it, leaving one for the trainer itself."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, world_size) - 1))


def _ignore_stop_signals(worker_id):
    """Workers leave SIGTERM/SIGINT to the trainer: schedulers signal the whole process group, and a worker
    dying first would crash the trainer before it can finish its step and write the preemption checkpoint.
    (Workers still exit when the trainer does: they watch their parent.)"""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, sampler, batch_size, workers, pin_memory, seed, drop_last=False):
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_skip_bad,
        pin_memory=pin_memory, drop_last=drop_last, generator=generator, worker_init_fn=_ignore_stop_signals,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)


class SyntheticLoader:
    """Random uint8 images made once on the host; the same model/AMP path runs on them, no disk involved."""

    def __init__(self, batch_size, crop_size, num_classes, steps, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.batch = Batch(torch.randint(0, 256, (batch_size, 3, crop_size, crop_size), dtype=torch.uint8,
                                         generator=g),
                           torch.randint(0, num_classes, (batch_size,), generator=g), [])
        self.steps = steps
        self.sampler = None

    def __iter__(self):
        for _ in range(self.steps):
            yield self.batch

    def __len__(self):
        return self.steps
