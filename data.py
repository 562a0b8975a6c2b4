"""Input pipeline: ImageNet-layout folders -> uint8 batches -> normalised tensors on the device.

Design choices (why, not what):
  * One function (find_layout) reads --data-path in any accepted layout (class folders, the Kaggle
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
import csv
import math
import os
import signal
import sys
from typing import NamedTuple

import torch
import torch.utils.data
from torchvision import transforms

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
# Layouts: find the training folder and every validation image's label before any model is built
# ----------------------------------------------------------------------------

KAGGLE_SUBDIR = os.path.join("ILSVRC", "Data", "CLS-LOC")
KAGGLE_VAL_CSV = "LOC_val_solution.csv"


def _is_hidden(name):
    return name.startswith(".") or name in ("Thumbs.db", "desktop.ini", "__MACOSX")


def list_classes(folder):
    """The sorted class folders of `folder`, or DataError if it cannot be read."""
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if e.is_dir() and not _is_hidden(e.name))
    except OSError as e:
        raise DataError(f"{folder}: cannot read the folder ({e.strerror or e})") from None


def is_image_file(path):
    name = os.path.basename(path)
    return not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


class Scan(NamedTuple):
    """The image files under one folder, and what the scan left out."""
    paths: list        # in torchvision ImageFolder's order: by folder path, then by file name
    repeated: list     # paths skipped because they lead to a file or folder already listed (links, loops)
    unreadable: list   # [(folder, why)] folders that could not be listed


def scan_images(folder, avoid=frozenset()):
    """Every image file under `folder`, following links as torchvision's ImageFolder does, but each real file
    and each real folder once: a link back up the tree (a symlink loop) made os.walk list the same files
    again at every depth until the path grew too long. Identity is (st_dev, st_ino) of what a path resolves
    to; the first path in walk order is kept. `avoid`: identities of folders never to enter (the other class
    folders and the split's root, so a link cannot pull another class's images in under this label).
    Unlike os.walk, a folder that cannot be read is reported."""
    seen_folders, listed, unreadable, repeated = set(avoid), [], [], []
    pending = [folder]
    while pending:
        path = pending.pop()
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen_folders and path != folder:
                repeated.append(path)
                continue
            seen_folders.add((st.st_dev, st.st_ino))
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            unreadable.append((path, e.strerror or str(e)))
            continue
        files, subfolders = [], []
        for entry in entries:
            if entry.is_dir():  # follows links, as os.walk(followlinks=True)
                subfolders.append(entry.path)
            elif is_image_file(entry.name):
                files.append((entry.path, _file_identity(entry, st.st_dev)))
        listed.append((path, files))
        pending.extend(reversed(subfolders))  # depth first, in name order: the first path to a folder wins
    seen_files, paths = set(), []
    for _, files in sorted(listed, key=lambda item: item[0]):  # ImageFolder's order
        for path, identity in files:
            if identity is not None and identity in seen_files:
                repeated.append(path)
                continue
            seen_files.add(identity)
            paths.append(path)
    return Scan(paths, repeated, unreadable)


def scan_classes(root, classes):
    """root/<class>/** -> ([(path, class index)], Scan of the whole split), in ImageFolder's order."""
    def identity(path):
        try:
            st = os.stat(path)
            return st.st_dev, st.st_ino
        except OSError:
            return None
    class_folders = [os.path.join(root, name) for name in classes]
    avoid = {identity(root), *map(identity, class_folders)} - {None}
    samples, repeated, unreadable = [], [], []
    for index, folder in enumerate(class_folders):
        scan = scan_images(folder, avoid)
        samples += [(path, index) for path in scan.paths]
        repeated += scan.repeated
        unreadable += scan.unreadable
    return samples, Scan([path for path, _ in samples], repeated, unreadable)


def _file_identity(entry, folder_dev):
    """(st_dev, st_ino) of the file an entry resolves to; None for a broken link (kept: it is reported as
    unreadable when loaded, as before). A plain file needs no system call: its inode comes with the listing."""
    if not entry.is_symlink():
        return folder_dev, entry.inode()
    try:
        st = os.stat(entry.path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def describe_repeats(scan, where):
    """One warning line for the paths a scan skipped, or None."""
    if scan is None or not scan.repeated:
        return None
    return (f"{where}: skipped {len(scan.repeated)} path(s) that lead to a file or folder already listed "
            f"(symlink loops or duplicate links), each real file is used once; e.g. {scan.repeated[0]}")


class Layout(NamedTuple):
    """Where a data set's training classes are and what every validation image is (whatever the layout)."""
    kind: str           # said in the log: "class folders", "Kaggle ImageNet", "flat val/ (class in file names)"
    train_root: str     # train/<class>/<image>
    val_root: str
    classes: list       # sorted class folder names of train_root: the label order in every layout
    val_samples: list   # [(path, class index)]
    val_scan: Scan      # what the validation scan skipped (class-folder layout), else None


def find_layout(root):
    """The layout of --data-path, or DataError saying what is wrong. Accepted:
      * root/train/<class>/..., root/val/<class>/...                                   (class folders)
      * the Kaggle download: root/ILSVRC/Data/CLS-LOC/train/<wnid>/..., a flat .../val/ of
        ILSVRC2012_val_*.JPEG, labels in root/LOC_val_solution.csv (first wnid of PredictionString)
      * root/train/<class>/... with a flat root/val/ whose file names end in _<class>.<ext>
        (or labelled by root/LOC_val_solution.csv).
    The class order is always the sorted training class folders, so checkpoints are interchangeable."""
    if not root:
        raise DataError("no dataset given: pass --data-path /path/to/imagenet (a folder with train/ and val/)")
    if not os.path.isdir(root):
        raise DataError(f"--data-path {root}: no such directory")
    kaggle = not os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, KAGGLE_SUBDIR))
    base = os.path.join(root, KAGGLE_SUBDIR) if kaggle else root
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(base, split)):
            raise DataError(f"--data-path {root}: missing '{split}/' folder (expected {root}/{split}/<class>/<image>, "
                            f"or the Kaggle download's {KAGGLE_SUBDIR}/{split}/)")
    train_root, val_root = os.path.join(base, "train"), os.path.join(base, "val")
    classes = list_classes(train_root)
    if not classes:
        raise DataError(f"{train_root} has no class folders (expected train/<class>/<image>)")
    val_classes = list_classes(val_root)
    if val_classes:
        if val_classes != classes:
            only_train = sorted(set(classes) - set(val_classes))[:5]
            only_val = sorted(set(val_classes) - set(classes))[:5]
            raise DataError(f"val classes differ from train classes ({len(val_classes)} vs {len(classes)}; "
                            f"only in train: {only_train}, only in val: {only_val})")
        samples, scan = _class_folder_samples(val_root, classes)
        return Layout("class folders", train_root, val_root, classes, samples, scan)
    files = _flat_images(val_root)
    csv_path = os.path.join(root, KAGGLE_VAL_CSV)
    if os.path.isfile(csv_path):
        samples = _csv_samples(files, csv_path, classes)
        kind = f"Kaggle ImageNet ({KAGGLE_SUBDIR}, val labels from {KAGGLE_VAL_CSV})" if kaggle else \
            f"class folders for train/, flat val/ labelled by {KAGGLE_VAL_CSV}"
    else:
        samples = _file_name_samples(files, classes)
        kind = "class folders for train/, flat val/ with the class at the end of each file name"
    return Layout(kind, train_root, val_root, classes, samples, None)


def _class_folder_samples(val_root, classes):
    """val/<class>/... -> [(path, index)]; a folder that cannot be read would silently shrink the evaluation."""
    samples, scan = scan_classes(val_root, classes)
    if scan.unreadable:
        folder, why = scan.unreadable[0]
        more = f" (and {len(scan.unreadable) - 1} more)" if len(scan.unreadable) > 1 else ""
        raise DataError(f"validation folder {folder} cannot be read ({why}){more}: its images would be left out "
                        f"of the evaluation; fix its permissions or remove it")
    return samples, scan


def _flat_images(val_root):
    try:
        with os.scandir(val_root) as entries:
            files = sorted(e.path for e in entries if e.is_file() and is_image_file(e.name))
    except OSError as e:
        raise DataError(f"{val_root}: cannot read the folder ({e.strerror or e})") from None
    if not files:
        raise DataError(f"{val_root} has neither class folders nor image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _label_error(paths, message):
    """One line naming the first offending file and how many more there are."""
    more = f" (and {len(paths) - 1} more validation images)" if len(paths) > 1 else ""
    return DataError(f"{paths[0]}: {message}{more}")


def read_val_solution(csv_path):
    """LOC_val_solution.csv -> {ImageId: (first wnid of PredictionString, line number)}; DataError naming the
    line for anything else."""
    labels = {}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if [h.strip() for h in header or []] != ["ImageId", "PredictionString"]:
                raise DataError(f"{csv_path} line 1: expected the header 'ImageId,PredictionString', "
                                f"found {','.join(header or [])!r}")
            for row in rows:
                if not any(field.strip() for field in row):
                    continue  # blank line
                words = row[1].split() if len(row) == 2 else []
                if not row[0].strip() or not words:
                    raise DataError(f"{csv_path} line {rows.line_num}: expected 'ImageId,PredictionString' "
                                    f"(e.g. ILSVRC2012_val_00000001,n01751748 0 0 10 10), found {','.join(row)!r}")
                image_id, label = row[0].strip(), words[0]
                if labels.get(image_id, (label,))[0] != label:
                    raise DataError(f"{csv_path} line {rows.line_num}: {image_id} is labelled {label} here and "
                                    f"{labels[image_id][0]} on line {labels[image_id][1]}")
                labels[image_id] = (label, rows.line_num)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot be read as a CSV file ({getattr(e, 'strerror', None) or e})") from None
    return labels


def _csv_samples(files, csv_path, classes):
    labels = read_val_solution(csv_path)
    index = {name: i for i, name in enumerate(classes)}
    unlabelled = [p for p in files if os.path.splitext(os.path.basename(p))[0] not in labels]
    if unlabelled:
        raise _label_error(unlabelled, f"no label in {csv_path} (no row with this ImageId)")
    samples, unknown = [], []
    for path in files:
        label, line = labels[os.path.splitext(os.path.basename(path))[0]]
        if label in index:
            samples.append((path, index[label]))
        else:
            unknown.append((path, label, line))
    if unknown:
        path, label, line = unknown[0]
        raise _label_error([u[0] for u in unknown], f"labelled {label} ({csv_path} line {line}), which is not a "
                                                    f"class folder of train/ ({len(classes)} classes)")
    return samples


def _file_name_samples(files, classes):
    """val/<anything>_<class>.<ext>: the longest training class name the file name ends with."""
    index = {name: i for i, name in enumerate(classes)}
    samples, unlabelled = [], []
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0]
        cuts = [k for k, ch in enumerate(stem) if ch == "_"]
        found = next((index[stem[k + 1:]] for k in cuts if stem[k + 1:] in index), None)
        if found is None:
            unlabelled.append(path)
        else:
            samples.append((path, found))
    if unlabelled:
        stem = os.path.splitext(os.path.basename(unlabelled[0]))[0]
        ending = f"ends in '_{stem.rsplit('_', 1)[1]}', which is not" if "_" in stem else "does not end in _<class> of"
        raise _label_error(unlabelled, f"a flat val/ needs each file name to end in _<class>.<ext> (e.g. "
                                       f"ILSVRC2012_val_00000001_n01751748.JPEG) or a {KAGGLE_VAL_CSV}; this name "
                                       f"{ending} a class folder of train/ ({len(classes)} classes)")
    return samples


def check_dataset_layout(root):
    """The class names of --data-path in any accepted layout (see find_layout), or DataError saying what is
    wrong. main.validate_args calls it before any work starts."""
    return find_layout(root).classes


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
    ranks), and rank r of W takes positions r, r + W, r + 2W, ... of it, like DistributedSampler (padded by
    wrapping so every rank gets the same number of samples). A step of global batch B therefore consumes
    exactly positions [k * B, (k + 1) * B) of the global order, whatever W is, so a run stopped after k steps
    records `start_sample` = k * B, and the resumed run, on any number of ranks, shares the rest of the order
    among its ranks: every sample of the epoch is used once across the interruption. Without a resume
    (start_sample 0) the shards are exactly DistributedSampler's.

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

    def set_epoch(self, epoch, start_sample=0):
        """start_sample: how many samples of this epoch's global order all ranks together have already
        consumed (steps done x global batch), 0 for a fresh epoch."""
        self.epoch = epoch
        self.start_sample = start_sample

    def epoch_length(self):
        """Samples in one epoch of the global order, unpadded (the LR position is epoch + done / this)."""
        return self.dataset_size

    def _global_order(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=g).tolist()
        else:
            order = list(range(self.dataset_size))
        return [(i, r) for i in order for r in range(self.repeats)]

    def _positions(self):
        """This rank's positions of the epoch's global order: the part after start_sample, padded to a
        multiple of the world size by carrying on around the order (as DistributedSampler pads)."""
        start = min(self.start_sample, self.epoch_length())
        remaining = math.ceil((self.epoch_length() - start) / self.num_replicas) * self.num_replicas
        return range(start + self.rank, start + remaining, self.num_replicas)

    def __iter__(self):
        order = self._global_order()
        return iter((self.epoch, *order[p % len(order)]) for p in self._positions())

    def __len__(self):
        return len(self._positions())


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
    (Workers still exit when the trainer does: they watch their parent.) SIGHUP too: a closed ssh session
    signals the whole session, and the trainer treats it as SIGTERM."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    # A signal can stop the trainer while it is receiving a batch from this worker (it honours a signal at once
    # while it waits for data); the worker's fd-sharing thread then reports the reset connection as a
    # traceback. The trainer has said why it stops: a lost connection to it is not news.
    sys.excepthook = _quiet_when_the_trainer_is_gone


def _quiet_when_the_trainer_is_gone(exc_type, exc, tb):
    if not issubclass(exc_type, (ConnectionError, EOFError)):
        sys.__excepthook__(exc_type, exc, tb)


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
