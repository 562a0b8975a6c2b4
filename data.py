"""Input pipeline: ImageNet-layout folders -> uint8 batches -> normalised tensors on the device.

Design choices (why, not what):
  * One function (layout.find_layout) reads --data-path in any accepted layout (class folders, the Kaggle
    download, a flat val/) and returns the training root and a list of (validation file, class index):
    everything after it (datasets, samplers, exact evaluation) is the same for every layout, and the
    class order is always the sorted training folders, so checkpoints are interchangeable.
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
import hashlib
import math
import os
import signal
import sys
import threading
from typing import NamedTuple, Optional

import torch
import torch.utils.data
from torchvision import transforms

from decode import FAST_DECODE_INTERPOLATIONS, INTERPOLATIONS, FastRandomResizedCrop, UnreadableImage, \
    load_encoded, load_rgb
from layout import IMAGE_EXTENSIONS, DataError, describe_repeats, find_layout, list_classes, scan_classes
from utils import log, warn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUTO_AUGMENT = ("ra", "ta_wide", "augmix", "imagenet")


# ----------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------

class ImageListDataset(torch.utils.data.Dataset):
    """(path, class index) samples that report undecodable files and reseed augmentation per sample.
    transform: PIL image (or decode.EncodedImage) -> uint8 tensor; loader: how a file is read (load_rgb
    decodes; decode.load_encoded only reads, the transform decodes)."""

    def __init__(self, samples, classes, transform, seed=0, loader=load_rgb, root=None):
        self.samples, self.classes, self.transform, self.seed, self.loader = samples, classes, transform, seed, loader
        self.root = root
        self.class_to_idx = {name: i for i, name in enumerate(classes)}
        self.targets = [target for _, target in samples]
        if not samples:
            raise DataError(f"{root} contains no image files ({', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self):
        return len(self.samples)

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


class ImageFolderDataset(ImageListDataset):
    """root/<class>/**/<image>: torchvision ImageFolder's classes and sample order, with hidden files and
    class folders skipped, each real file once (scan_images), and unreadable folders reported."""

    def __init__(self, root, transform, seed=0, loader=load_rgb):
        # Same class list as find_layout: a hidden folder (.ipynb_checkpoints, __MACOSX) is no class
        # and must not shift every label by one.
        classes = list_classes(root)
        samples, self.scan = scan_classes(root, classes)
        super().__init__(samples, classes, transform, seed=seed, loader=loader, root=root)

    def classes_without_images(self):
        """[(class, why)] for the classes this set has no image of: a model would learn to never predict them."""
        counts = [0] * len(self.classes)
        for _, target in self.samples:
            counts[target] += 1
        unreadable = {}
        for folder, why in self.scan.unreadable:
            unreadable.setdefault(os.path.relpath(folder, self.root).split(os.sep)[0], why)
        return [(name, f"unreadable folder: {unreadable[name]}" if name in unreadable else "no image files")
                for name, count in zip(self.classes, counts) if not count]


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
    """Shuffled shard of the training set for one rank, able to resume mid-epoch on any number of ranks.

    The epoch has one global order (a fresh permutation from seed + epoch, the same whatever the number of
    ranks), and rank r of W takes positions r, r + W, r + 2W, ... of it, like DistributedSampler but without
    its padding (a padded epoch trains a few samples twice, and a resume on another number of ranks would pad
    differently). A step of global batch B therefore consumes exactly positions [k * B, (k + 1) * B) of the
    global order, whatever W is, so a run stopped after k steps records k * B samples done, and the resumed
    run, on any number of ranks, shares the rest of the order among its ranks: every sample of the epoch is
    used exactly once across the interruption (its last step may give the ranks one sample more or less).

    `repeats` > 1 is repeated augmentation (--ra-sampler, as in DeiT/torchvision):
    each image appears `repeats` times in a row of the global order, so its copies
    land on different ranks with different augmentations; the epoch length stays
    that of one pass over the data (epoch_length()).
    Yields (epoch, index, repeat) keys, which ImageListDataset turns into seeds, so augmentation depends on
    (seed, epoch, index, repeat) only, not on the rank or the worker that loads a sample.
    """

    def __init__(self, dataset_size, num_replicas=1, rank=0, seed=0, shuffle=True, repeats=1):
        self.dataset_size = dataset_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.repeats = repeats
        self.epoch = 0
        self.start_sample = 0
        self.order_seed = seed

    def set_epoch(self, epoch, start_sample=0, order_seed=None):
        """start_sample: how many samples of this epoch's global order all ranks together have already
        consumed (steps done x global batch), 0 for a fresh epoch. order_seed: the seed of the order to continue
        (a checkpoint's, when the run resumes its epoch with another --seed); None: this run's."""
        self.epoch = epoch
        self.start_sample = start_sample
        self.order_seed = self.seed if order_seed is None else order_seed

    def epoch_length(self):
        """Samples in one epoch of the global order, unpadded (the LR position is epoch + done / this)."""
        return self.dataset_size

    def _global_order(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.order_seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=g).tolist()
        else:
            order = list(range(self.dataset_size))
        return [(i, r) for i in order for r in range(self.repeats)]

    def _positions(self):
        """This rank's positions of the epoch's global order after start_sample, not padded: each position is
        taken once by one rank, so an epoch interrupted and resumed on another number of ranks uses every sample
        exactly once. The ranks' shares then differ by at most one sample, in the epoch's last step (the
        trainer weights each rank's loss by its share of that step's images)."""
        start = min(self.start_sample, self.epoch_length())
        return range(start + self.rank, self.epoch_length(), self.num_replicas)

    def __iter__(self):
        order = self._global_order()
        return iter((self.epoch, *order[p]) for p in self._positions())

    def __len__(self):
        return len(self._positions())


class ExactEvalSampler(torch.utils.data.Sampler):
    """Rank r evaluates images r, r+W, r+2W, ...: no padding, no drops, each image exactly once."""

    def __init__(self, dataset_size, num_replicas=1, rank=0):
        self.dataset_size, self.num_replicas = dataset_size, num_replicas
        self.indices = list(range(rank, dataset_size, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# ----------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------

def _ignore_stop_signals(worker_id):
    """Workers leave the stop signals (stop.STOP_SIGNALS) to the trainer: schedulers signal the whole process
    group, and a worker dying first would crash the trainer before it can finish its step and save.
    (Workers still exit when the trainer does: they watch their parent.) SIGHUP too: a closed ssh session
    signals the whole session, and the trainer treats it as SIGTERM."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    # A signal can stop the trainer while it is receiving a batch from this worker (it honours a signal at once
    # while it waits for data); the worker's fd-sharing thread then reports the reset connection as a
    # traceback. The trainer has said why it stops: a lost connection to it is not news.
    sys.excepthook = _quiet_when_the_trainer_is_gone


def _quiet_when_the_trainer_is_gone(exc_type, exc, tb):
    if not issubclass(exc_type, (ConnectionError, EOFError)):
        sys.__excepthook__(exc_type, exc, tb)


def batches(loader):
    """iter(loader), with the DataLoader's SIGCHLD handler taken off again. That handler raises "worker killed"
    from whatever line the trainer is on when a worker dies (the OOM killer), possibly between an optimizer step
    and its count, or inside a collective; without it the dead worker is found by the loader itself at the next
    fetch (within seconds), at a step boundary, where the run stops cleanly (engine.next_batch)."""
    iterator = iter(loader)
    if getattr(loader, "num_workers", 0) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    return iterator


def eval_steps(loader):
    """Batches of the rank with the most validation images: every rank goes through that many boundaries
    (ranks with fewer images have none in the last), so the ranks can agree at each."""
    sampler = loader.sampler
    if not isinstance(sampler, ExactEvalSampler):
        return len(loader)
    return math.ceil(math.ceil(sampler.dataset_size / sampler.num_replicas) / loader.batch_size)


PREFETCH_FACTOR = 4  # batches each loader worker keeps ready
SHARED_MEMORY = "/dev/shm"


def make_loader(dataset, sampler, batch_size, workers, pin_memory, seed, drop_last=False):
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_skip_bad,
        pin_memory=pin_memory, drop_last=drop_last, generator=generator, worker_init_fn=_ignore_stop_signals,
        persistent_workers=workers > 0, prefetch_factor=PREFETCH_FACTOR if workers > 0 else None)


def shared_memory_need(workers, batch_size, crop_size, processes=1):
    """Bytes of shared memory the loaders of `processes` ranks on one machine hold at once: each worker's
    prefetched uint8 batches, plus the batch the trainer is using and the one being pinned."""
    if workers == 0:
        return 0
    return processes * (workers * PREFETCH_FACTOR + 2) * batch_size * 3 * crop_size * crop_size


def _size(n):
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def check_shared_memory(workers, batch_size, crop_size, processes=1, folder=SHARED_MEMORY):
    """Workers hand batches to the trainer through shared memory (torch allocates it in /dev/shm under
    either sharing strategy, so switching strategy would not help). Docker gives a container 64 MB of it:
    the first batches then fail deep in a worker with a traceback and the run hangs. Say so at start-up."""
    need = shared_memory_need(workers, batch_size, crop_size, processes)
    if not need or not os.path.isdir(folder):
        return
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if need <= free:
        return
    batches_that_fit = free // (processes * batch_size * 3 * crop_size * crop_size)
    fits = min(workers - 1, max(0, (batches_that_fit - 2) // PREFETCH_FACTOR))
    raise DataError(f"{folder} has {_size(free)} free but the data loaders need about "
                    f"{_size(need)} ({processes} process(es) x ({workers} workers x {PREFETCH_FACTOR} + 2) "
                    f"batches x {batch_size} images x 3x{crop_size}x{crop_size} bytes): give the container more "
                    f"(docker run --shm-size=8g ...) or use fewer workers (--workers {fits} fits; 0 needs none)")


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


# ----------------------------------------------------------------------------
# The run's data
# ----------------------------------------------------------------------------

class Data(NamedTuple):
    train_loader: object
    train_sampler: Optional[ResumableDistributedSampler]  # None for --synthetic
    val_loader: object                                     # None for --synthetic
    classes: list
    train_files: list = ()                                 # the training images' paths (for order())

    def order(self, seed):
        """What an epoch's sample order is drawn from (checkpoint.Position.order): the seed, the number of
        training images and a digest of their names (relative to train/), so that a mid-epoch resume can tell
        whether the rest of that order is the rest of what was trained."""
        if self.train_sampler is None:
            return {"seed": seed, "images": None, "digest": None}
        digest = hashlib.sha256("\n".join(self.train_files).encode("utf-8", "surrogateescape")).hexdigest()[:16]
        return {"seed": seed, "images": len(self.train_files), "digest": digest}


def build(args, run, found=None):
    """The training and validation loaders of this rank (SyntheticLoader for --synthetic), with the data set's
    warnings (classes without images, repeated files) and its one-line description. `found`: the data set's
    layout.Layout when main.preflight has read it already."""
    if args.synthetic:
        classes = [str(i) for i in range(args.num_classes or 1000)]
        loader = SyntheticLoader(run.local_batch, args.train_crop_size, len(classes), args.max_steps or 100,
                                 args.seed, pin_memory=run.device.is_accelerator)
        return Data(loader, None, None, classes)
    if args.cache_dataset:
        log("Note: --cache-dataset is accepted for the original's scripts and does nothing here: the file list "
            "is scanned at start-up (seconds), and the original's cache held a pickled dataset object")
    check_shared_memory(run.workers, run.local_batch, max(args.train_crop_size, args.val_crop_size),
                        run.local_world_size)
    found = found or find_layout(args.data_path)  # class folders, the Kaggle download, or a flat val/
    train_set = train_dataset(found.train_root, args.train_crop_size, args.interpolation, args.crop_scale,
                              args.hflip_prob, args.auto_augment, args.ra_magnitude, args.augmix_severity,
                              args.random_erase, fast_decode=args.fast_decode, seed=args.seed)
    val_set = ImageListDataset(found.val_samples, found.classes, eval_transform(
        args.val_resize_size, args.val_crop_size, args.interpolation), seed=args.seed, root=found.val_root)
    empty = train_set.classes_without_images()
    if empty:
        warn(f"{len(empty)} of {len(train_set.classes)} classes have no usable training image and will never be "
             f"learned: " + ", ".join(f"{name} ({why})" for name, why in empty[:10]))
    for skipped in (describe_repeats(train_set.scan, found.train_root), describe_repeats(found.val_scan,
                                                                                         found.val_root)):
        if skipped and run.rank == 0:
            warn(skipped)  # symlink loops, second names of a file: each real file is used once
    train_sampler = ResumableDistributedSampler(len(train_set), run.world_size, run.rank, args.seed,
                                                repeats=args.ra_reps if args.ra_sampler else 1)
    if args.batch_size > train_sampler.epoch_length() and run.rank == 0 and not args.test_only:
        warn(f"--batch-size {args.batch_size} is larger than the training set ({train_sampler.epoch_length()} "
             f"images): every epoch is a single step of {train_sampler.epoch_length()} images; lower --batch-size "
             f"(and --lr with it) to train more than one step per epoch")
    val_sampler = ExactEvalSampler(len(val_set), run.world_size, run.rank)
    pin = run.device.is_accelerator
    train_loader = make_loader(train_set, train_sampler, run.local_batch, run.workers, pin, args.seed)
    val_loader = make_loader(val_set, val_sampler, run.local_batch, run.workers, pin, args.seed)
    log(f"Data: {len(train_set)} train / {len(val_set)} val images, {len(train_set.classes)} classes from "
        f"{args.data_path} (layout: {found.kind})")
    files = [os.path.relpath(path, found.train_root) for path, _ in train_set.samples]
    return Data(train_loader, train_sampler, val_loader, train_set.classes, files)
