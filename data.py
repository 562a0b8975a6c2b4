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
  * Decoding lives in decode.py (PIL for everything, libjpeg-turbo for the fast
    training crop); this module only chooses which reader and which transform a
    dataset uses (train_dataset), so nothing is smuggled through attributes.
"""
import math
import os
import signal

import torch
import torch.utils.data
from torchvision import datasets, transforms

from cli import UserError
from decode import FAST_DECODE_INTERPOLATIONS, INTERPOLATIONS, FastRandomResizedCrop, UnreadableImage, \
    load_encoded, load_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
AUTO_AUGMENT = ("ra", "ta_wide", "augmix", "imagenet")


class DataError(UserError):
    """A dataset problem the user must fix (one-line message, exit code 2)."""


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

class ImageFolderDataset(datasets.ImageFolder):
    """torchvision's ImageFolder that skips hidden files, reports undecodable ones, and reseeds per sample."""

    def __init__(self, root, transform, seed=0, loader=load_rgb):
        # loader: how a file is read (load_rgb decodes; decode.load_encoded only reads, the transform decodes)
        super().__init__(root, transform=transform, loader=loader, is_valid_file=is_image_file, allow_empty=True)
        self.seed = seed
        if not self.samples:
            raise DataError(f"{root} contains no image files ({', '.join(IMAGE_EXTENSIONS)})")

    def classes_without_images(self):
        """[(class, why)] for the classes this set has no image of: a model would learn to never predict them.
        os.walk (torchvision's scan) skips a folder it cannot read without a word, so that is checked here."""
        counts = [0] * len(self.classes)
        for _, target in self.samples:
            counts[target] += 1
        problems = []
        for name, count in zip(self.classes, counts):
            if count:
                continue
            try:
                with os.scandir(os.path.join(self.root, name)) as entries:
                    next(entries, None)
                problems.append((name, "no image files"))
            except OSError as e:
                problems.append((name, f"unreadable folder: {e.strerror or e}"))
        return problems

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
                    ra_magnitude=9, augmix_severity=3, random_erase=0.0):
    """torchvision's training preset on PIL images (load_rgb), ending in a uint8 tensor."""
    steps = [transforms.RandomResizedCrop(crop_size, scale=tuple(scale), interpolation=INTERPOLATIONS[interpolation],
                                          antialias=True)]
    if hflip_prob > 0:
        steps.append(transforms.RandomHorizontalFlip(hflip_prob))
    if auto_augment:
        steps.append(auto_augment_transform(auto_augment, INTERPOLATIONS[interpolation], ra_magnitude,
                                            augmix_severity))
    steps.append(transforms.PILToTensor())
    if random_erase > 0:
        steps.append(random_erasing(random_erase))
    return transforms.Compose(steps)


def fast_train_transform(crop_size, interpolation="bilinear", scale=(0.08, 1.0), hflip_prob=0.5, random_erase=0.0):
    """The same crops and flips as train_transform, decoded by decode.FastRandomResizedCrop from files that
    decode.load_encoded has read (not decoded)."""
    steps = [FastRandomResizedCrop(crop_size, scale, interpolation=interpolation, hflip_prob=hflip_prob)]
    if random_erase > 0:
        steps.append(random_erasing(random_erase))
    return transforms.Compose(steps)


def fast_decode_applies(auto_augment=None, interpolation="bilinear"):
    """--fast-decode stands aside for PIL-level augmentations and filters it cannot reproduce."""
    return not auto_augment and interpolation in FAST_DECODE_INTERPOLATIONS


def train_dataset(root, crop_size, interpolation="bilinear", scale=(0.08, 1.0), hflip_prob=0.5, auto_augment=None,
                  ra_magnitude=9, augmix_severity=3, random_erase=0.0, fast_decode=False, seed=0):
    """The training set: the fast reader + transform where they apply, else torchvision's PIL path."""
    if fast_decode and fast_decode_applies(auto_augment, interpolation):
        transform = fast_train_transform(crop_size, interpolation, scale, hflip_prob, random_erase)
        return ImageFolderDataset(root, transform, seed=seed, loader=load_encoded)
    transform = train_transform(crop_size, interpolation, scale, hflip_prob, auto_augment, ra_magnitude,
                                augmix_severity, random_erase)
    return ImageFolderDataset(root, transform, seed=seed, loader=load_rgb)


def auto_augment_transform(policy, interpolation, magnitude=9, severity=3):
    """The PIL-level augmentation named by --auto-augment (applied after crop and flip, before PILToTensor)."""
    if policy == "ra":
        return transforms.RandAugment(interpolation=interpolation, magnitude=magnitude)
    if policy == "ta_wide":
        return transforms.TrivialAugmentWide(interpolation=interpolation)
    if policy == "augmix":
        return transforms.AugMix(interpolation=interpolation, severity=severity)
    if policy == "imagenet":
        return transforms.AutoAugment(transforms.AutoAugmentPolicy.IMAGENET, interpolation=interpolation)
    raise ValueError(f"unknown --auto-augment {policy!r}; choose from {', '.join(AUTO_AUGMENT)}")


def random_erasing(p):
    """RandomErasing on the uint8 tensor; erased pixels get the mean colour, i.e. 0 after normalisation,
    which is what torchvision's reference gets by erasing the normalised tensor with 0."""
    mean_pixel = tuple(round(255 * m) for m in IMAGENET_MEAN)
    return transforms.RandomErasing(p=p, value=mean_pixel)


def eval_transform(resize_size, crop_size, interpolation="bilinear"):
    return transforms.Compose([
        transforms.Resize(resize_size, interpolation=INTERPOLATIONS[interpolation], antialias=True),
        transforms.CenterCrop(crop_size),
        transforms.PILToTensor(),
    ])


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

def default_workers(local_world_size=1):
    """The cores this process may use, shared among the ranks on this machine, minus one per rank for the
    trainer itself. No fixed cap: a 16-core single-GPU box needs ~15 decoders to feed DenseNet-201 at bf16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, cores // max(1, local_world_size) - 1)


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
    """Random uint8 images made once on the host; the same model/AMP path runs on them, no disk involved.
    pin_memory: as the real loader does on accelerators, so the host-to-device copy is asynchronous."""

    def __init__(self, batch_size, crop_size, num_classes, steps, seed=0, pin_memory=False):
        g = torch.Generator().manual_seed(seed)
        self.batch = Batch(torch.randint(0, 256, (batch_size, 3, crop_size, crop_size), dtype=torch.uint8,
                                         generator=g),
                           torch.randint(0, num_classes, (batch_size,), generator=g), [])
        if pin_memory:
            self.batch.pin_memory()
        self.steps = steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.batch

    def __len__(self):
        return self.steps
