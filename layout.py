"""Data set layouts: --data-path read in any accepted layout (class folders, the Kaggle download, a flat val/)
into the training root, the sorted class names and every validation image's label, before any model is built;
and the scan of an image folder that follows links as torchvision's ImageFolder does but lists each real file
once. No torch import: the launchers and the argument checks scan without it."""
import csv
import os
from typing import NamedTuple

from cli import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(UserError):
    """A dataset problem the user must fix (one-line message, exit code 2)."""


KAGGLE_SUBDIR = os.path.join("ILSVRC", "Data", "CLS-LOC")
KAGGLE_VAL_CSV = "LOC_val_solution.csv"


def _is_hidden(name):
    return name.startswith(".") or name in ("Thumbs.db", "desktop.ini", "__MACOSX")


def list_classes(folder):
    """The sorted class folders of `folder`; DataError if it cannot be read, or if two class folders are one
    folder (see class_folder_identities)."""
    try:
        with os.scandir(folder) as entries:
            classes = sorted(e.name for e in entries if e.is_dir() and not _is_hidden(e.name))
    except OSError as e:
        raise DataError(f"{folder}: cannot read the folder ({e.strerror or e})") from None
    class_folder_identities(folder, classes)
    return classes


def _identity(path):
    """(st_dev, st_ino) of what `path` resolves to, or None if it cannot be reached."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def class_folder_identities(root, classes):
    """The identity of each class folder root/<class> (None: cannot be reached, which the scan reports), or
    DataError naming two class folders that are one folder: a class folder that is a link to another
    (train/c2 -> c1), or two links to the same folder. Each class folder is scanned, so its images would be
    trained and evaluated under both labels, which no model can tell apart; there is no safe way to go on
    (dropping one class would shift every label after it, keeping it empty would make a class that is never
    learned), so the user must fix the data set. A class folder that links to a folder outside the data set
    (a common way to assemble one) is one folder, and fine."""
    identities, first_path, pairs = [], {}, []
    for name in classes:
        path = os.path.join(root, name)
        identity = _identity(path)
        identities.append(identity)
        if identity is None:
            continue
        if identity in first_path:
            pairs.append((first_path[identity], path))
        else:
            first_path[identity] = path
    if pairs:
        first, second = pairs[0]
        links = [p for p in (first, second) if os.path.islink(p)]
        how = f"{links[0]} is a link to {os.path.realpath(links[0])}" if len(links) == 1 else \
            f"both lead to {os.path.realpath(second)}"
        more = f" (and {len(pairs) - 1} more such pair(s))" if len(pairs) > 1 else ""
        raise DataError(f"class folders {first} and {second} are one folder ({how}){more}: the same images would "
                        f"be trained and evaluated under two labels; remove the link, or give each class a folder "
                        f"of its own")
    return identities


def is_image_file(path):
    name = os.path.basename(path)
    return not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


class Scan(NamedTuple):
    """The image files under one folder, and what the scan left out."""
    paths: list        # in torchvision ImageFolder's order: by folder path, then by file name
    repeated: list     # paths skipped because they lead to a file or folder already listed (links, loops)
    unreadable: list   # [(folder, why)] folders that could not be listed


def scan_images(folder, avoid=frozenset(), seen_files=None):
    """Every image file under `folder`, following links as torchvision's ImageFolder does, but each real file
    and each real folder once: a link back up the tree (a symlink loop) made os.walk list the same files
    again at every depth until the path grew too long. Identity is (st_dev, st_ino) of what a path resolves
    to; the first path in walk order is kept. `avoid`: identities of folders never to enter (the other class
    folders and the split's root, so a link cannot pull another class's images in under this label).
    `seen_files`: identities of files already listed (by earlier classes), skipped here and added to.
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
    seen_files, paths = set() if seen_files is None else seen_files, []
    for _, files in sorted(listed, key=lambda item: item[0]):  # ImageFolder's order
        for path, identity in files:
            if identity is not None and identity in seen_files:
                repeated.append(path)
                continue
            seen_files.add(identity)
            paths.append(path)
    return Scan(paths, repeated, unreadable)


def scan_classes(root, classes):
    """root/<class>/** -> ([(path, class index)], Scan of the whole split), in ImageFolder's order. Each real
    file once in the whole split: a file linked into a second class (c2/x.jpg -> ../c1/a.jpg) stays in the
    first and is reported as repeated, as a second name for a file within one class is; two class folders
    that are one folder are a DataError (class_folder_identities)."""
    avoid = {_identity(root), *class_folder_identities(root, classes)} - {None}
    samples, repeated, unreadable, seen_files = [], [], [], set()
    for index, name in enumerate(classes):
        scan = scan_images(os.path.join(root, name), avoid, seen_files)
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
