"""Data set layouts and the scan of them: ImageNet as Kaggle ships it, a flat val/ with the class in each file
name, unreadable validation folders and symlink loops (issues 19 item 3, 20 items 17 and 18)."""
import csv
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torchvision

from conftest import REPO, SMALL_RUN, assert_ok, assert_one_line_error, run_main, write_image_folder

import data
import layout as layout_lib

WNIDS = ["n01440764", "n01443537", "n01484850"]
ENV = {"OMP_NUM_THREADS": "1"}
TINY = ["--model", "densenet121", *SMALL_RUN, "--batch-size", "8", "--lr", "0.01"]


def class_folders(root):
    """3 classes named like ImageNet's (wnids), 8 train / 4 val images each."""
    write_image_folder(root, classes=3, train_per_class=8, val_per_class=4)
    for split in ("train", "val"):
        for i, wnid in enumerate(WNIDS):
            os.rename(os.path.join(root, split, f"class_{i}"), os.path.join(root, split, wnid))
    return str(root)


def val_files(root):
    """[(path, wnid)] of a class-folder val/, in the layout's own order."""
    return [(os.path.join(root, "val", wnid, name), wnid)
            for wnid in WNIDS for name in sorted(os.listdir(os.path.join(root, "val", wnid)))]


def as_kaggle(folders, dest, shuffle=False):
    """The same images as Kaggle's ImageNet download: ILSVRC/Data/CLS-LOC/train/<wnid>/, a flat val/ of
    ILSVRC2012_val_<n>.JPEG, LOC_val_solution.csv and LOC_synset_mapping.txt beside ILSVRC/."""
    base = os.path.join(dest, "ILSVRC", "Data", "CLS-LOC")
    shutil.copytree(os.path.join(folders, "train"), os.path.join(base, "train"))
    os.makedirs(os.path.join(base, "val"))
    files = val_files(folders)
    rows = []
    for n, (path, wnid) in enumerate(files, 1):
        image_id = f"ILSVRC2012_val_{n:08d}"
        shutil.copy(path, os.path.join(base, "val", image_id + ".JPEG"))
        rows.append([image_id, f"{wnid} 10 12 30 38 {wnid} 0 0 20 20 "])  # boxes: several per row, as Kaggle's
    if shuffle:
        random.Random(0).shuffle(rows)
    write_csv(os.path.join(dest, "LOC_val_solution.csv"), rows)
    with open(os.path.join(dest, "LOC_synset_mapping.txt"), "w") as f:
        f.writelines(f"{wnid} class number {i}\n" for i, wnid in enumerate(WNIDS))
    return str(dest)


def write_csv(path, rows, header=("ImageId", "PredictionString")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def as_flat_val(folders, dest):
    """train/<wnid>/ as it is, val/ flat with names ending in _<wnid>.JPEG (other ImageNet mirrors)."""
    shutil.copytree(os.path.join(folders, "train"), os.path.join(dest, "train"))
    os.makedirs(os.path.join(dest, "val"))
    for n, (path, wnid) in enumerate(val_files(folders), 1):
        shutil.copy(path, os.path.join(dest, "val", f"ILSVRC2012_val_{n:08d}_{wnid}.JPEG"))
    return str(dest)


def labelled_contents(layout):
    """{sha1 of the file: class name} of a layout's validation images, whatever their names or order."""
    out = {}
    for path, index in layout.val_samples:
        with open(path, "rb") as f:
            out[hashlib.sha1(f.read()).hexdigest()] = layout.classes[index]
    return out


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    folders = class_folders(base / "folders")
    return {"folders": folders, "kaggle": as_kaggle(folders, base / "kaggle", shuffle=True),
            "kaggle_ordered": as_kaggle(folders, base / "kaggle_ordered"), "flat": as_flat_val(folders, base / "flat")}


# Issue 19 item 3: the Kaggle download and flat val/ folders --------------------------------------------------

def test_every_layout_lists_the_same_images_labels_and_classes(layouts):
    reference = layout_lib.find_layout(layouts["folders"])
    assert reference.kind == "class folders" and reference.classes == WNIDS
    truth = labelled_contents(reference)
    assert len(truth) == 12
    for name in ("kaggle", "kaggle_ordered", "flat"):
        layout = layout_lib.find_layout(layouts[name])
        assert layout.classes == WNIDS, name
        assert layout_lib.check_dataset_layout(layouts[name]) == WNIDS
        assert labelled_contents(layout) == truth, name  # each file its own class, not only the right counts
        assert os.path.samefile(layout.train_root, os.path.join(layouts[name], *(
            ["ILSVRC", "Data", "CLS-LOC"] if name.startswith("kaggle") else []), "train"))
    assert "Kaggle" in layout_lib.find_layout(layouts["kaggle"]).kind
    assert "file name" in layout_lib.find_layout(layouts["flat"]).kind


def test_kaggle_layout_gives_the_same_test_only_results_as_class_folders(layouts, tmp_path):
    out = tmp_path / "run"
    assert_ok(run_main(["--data-path", layouts["folders"], "--output-dir", str(out), *TINY, "--epochs", "1",
                        "--max-steps", "2"], env=ENV))
    results = {}
    for name in ("folders", "kaggle_ordered"):
        proc = run_main(["--data-path", layouts[name], "--resume", str(out / "checkpoint.pth"), "--test-only",
                         *TINY], env=ENV)
        log = assert_ok(proc)
        data_line = re.search(r"^Data: (\d+) train / (\d+) val images, (\d+) classes from \S+ \(layout: (.*)\)$",
                              log, re.M)
        loss = re.search(r"^Test: loss (\S+), (\d+) images", log, re.M)
        acc = re.search(r"^ \* Acc@1 .*$", log, re.M)
        assert data_line and loss and acc, log
        results[name] = {"counts": data_line.groups()[:3], "layout": data_line.group(4),
                         "loss": loss.groups(), "acc": acc.group(0)}
    folders, kaggle = results["folders"], results["kaggle_ordered"]
    assert folders["counts"] == kaggle["counts"] == ("24", "12", "3")
    assert (folders["loss"], folders["acc"]) == (kaggle["loss"], kaggle["acc"])
    assert folders["layout"] == "class folders" and "Kaggle" in kaggle["layout"]


def test_kaggle_label_problems_are_one_line_naming_the_file(layouts, tmp_path):
    root = as_kaggle(layouts["folders"], tmp_path / "k")
    csv_path = os.path.join(root, "LOC_val_solution.csv")
    rows = list(csv.reader(open(csv_path)))[1:]
    # An image with no row in the CSV
    write_csv(csv_path, [r for r in rows if r[0] != "ILSVRC2012_val_00000005"])
    proc = run_main(["--data-path", root, *TINY, "--epochs", "1"], env=ENV)
    assert_one_line_error(proc, "ILSVRC2012_val_00000005.JPEG: no label in")
    assert proc.returncode == 2
    # A label that is not a training class
    write_csv(csv_path, [[r[0], "n99999999 1 1 2 2"] if r[0] == "ILSVRC2012_val_00000007" else r for r in rows])
    with pytest.raises(layout_lib.DataError, match=r"ILSVRC2012_val_00000007\.JPEG: labelled n99999999 \("
                                             r".*LOC_val_solution\.csv line \d+\), which is not a class"):
        layout_lib.check_dataset_layout(root)


@pytest.mark.parametrize("header, rows, expected", [
    (("ImageId", "Label"), [], r"line 1: expected the header 'ImageId,PredictionString'"),
    (("ImageId", "PredictionString"), [["ILSVRC2012_val_00000001"]], r"line 2: expected 'ImageId,PredictionString'"),
    (("ImageId", "PredictionString"), [["ILSVRC2012_val_00000001", "  "]], r"line 2: expected"),
    (("ImageId", "PredictionString"), [["ILSVRC2012_val_00000001", "n01440764 1 1 2 2"],
                                       ["ILSVRC2012_val_00000001", "n01443537 1 1 2 2"]],
     r"line 3: ILSVRC2012_val_00000001 is labelled n01443537 here and n01440764 on line 2"),
])
def test_malformed_val_solution_csv_is_one_line(layouts, tmp_path, header, rows, expected):
    root = as_kaggle(layouts["folders"], tmp_path / "k")
    write_csv(os.path.join(root, "LOC_val_solution.csv"), rows, header=header)
    with pytest.raises(layout_lib.DataError, match=expected) as e:
        layout_lib.check_dataset_layout(root)
    assert "\n" not in str(e.value)


def test_flat_val_name_without_a_class_is_one_line(layouts, tmp_path):
    root = as_flat_val(layouts["folders"], tmp_path / "f")
    os.rename(os.path.join(root, "val", f"ILSVRC2012_val_00000003_{WNIDS[0]}.JPEG"),
              os.path.join(root, "val", "ILSVRC2012_val_00000003_n0999.JPEG"))
    with pytest.raises(layout_lib.DataError, match=r"ILSVRC2012_val_00000003_n0999\.JPEG: .*ends in '_n0999', which is "
                                             r"not a class folder of train/ \(3 classes\)"):
        layout_lib.check_dataset_layout(root)


def test_class_names_with_underscores_in_flat_val(tmp_path):
    # The longest class name a file name ends with: class_1 is not mistaken for a class "1".
    root = write_image_folder(tmp_path / "d", classes=2, train_per_class=2, val_per_class=1)
    os.makedirs(os.path.join(root, "train", "1"))
    shutil.copy(os.path.join(root, "train", "class_0", "img_0.JPEG"), os.path.join(root, "train", "1"))
    for c in ("class_0", "class_1"):
        shutil.move(os.path.join(root, "val", c, "img_0.JPEG"), os.path.join(root, "val", f"img_0_{c}.JPEG"))
        os.rmdir(os.path.join(root, "val", c))
    layout = layout_lib.find_layout(root)
    assert layout.classes == ["1", "class_0", "class_1"]
    assert sorted((os.path.basename(p), layout.classes[i]) for p, i in layout.val_samples) == \
        [("img_0_class_0.JPEG", "class_0"), ("img_0_class_1.JPEG", "class_1")]


# Issue 20 item 17: an unreadable validation class folder -------------------------------------------------------

# Root reads any folder whatever its mode: the run drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (setpriv,
# util-linux), so a chmod-000 folder it owns is unreadable to it, as to any user.
NO_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


def test_unreadable_val_class_folder_is_an_error_at_start(layouts, tmp_path):
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot make a folder unreadable")
    root = tmp_path / "d"
    shutil.copytree(layouts["folders"], root)
    locked = root / "val" / WNIDS[1]
    os.chmod(locked, 0)
    try:
        prefix = NO_DAC if os.geteuid() == 0 else []
        proc = subprocess.run([*prefix, sys.executable, os.path.join(REPO, "main.py"), "--data-path", str(root),
                               "--output-dir", str(tmp_path / "out"), *TINY, "--epochs", "1"], cwd=REPO,
                              env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    finally:
        os.chmod(locked, 0o755)
    assert_one_line_error(proc, f"validation folder {locked} cannot be read (Permission denied)")
    assert proc.returncode == 2 and "Epoch" not in proc.stdout  # before any work


# Issue 20 item 18: symlink loops ------------------------------------------------------------------------------

def test_scan_order_is_image_folders(tmp_path):
    # Nested folders, hidden files, mixed case: the same samples in the same order as torchvision's ImageFolder
    # (the order the sampler's permutation indexes, so runs and checkpoints from before still line up).
    root = write_image_folder(tmp_path / "d", classes=2, train_per_class=3, val_per_class=1)
    train = os.path.join(root, "train")
    for sub in ("class_0/b", "class_0/a-b", "class_0/a/x", "class_1/.hidden"):
        os.makedirs(os.path.join(train, sub))
        shutil.copy(os.path.join(train, "class_1", "img_0.JPEG"), os.path.join(train, sub, "Z.jpeg"))
    shutil.copy(os.path.join(train, "class_1", "img_1.JPEG"), os.path.join(train, "class_0", "a", "A.JPG"))
    open(os.path.join(train, "class_0", "._img_0.JPEG"), "w").close()
    ours = data.ImageFolderDataset(train, transform=None)
    theirs = torchvision.datasets.ImageFolder(train, is_valid_file=layout_lib.is_image_file)
    assert ours.samples == theirs.samples and ours.classes == theirs.classes
    assert not ours.scan.repeated and not ours.scan.unreadable


def test_symlink_loops_use_each_file_once_and_say_so(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=3, train_per_class=8, val_per_class=4)
    os.symlink(".", os.path.join(root, "train", "class_0", "loop"))               # a folder linking to itself
    os.symlink("..", os.path.join(root, "val", "class_1", "up"))                  # to the folder above
    os.symlink("img_0.JPEG", os.path.join(root, "train", "class_2", "again.JPEG"))  # a second name for a file
    proc = run_main(["--data-path", root, "--output-dir", str(tmp_path / "out"), *TINY, "--epochs", "1",
                     "--max-steps", "1"], env=ENV)
    log = assert_ok(proc)
    assert "Data: 24 train / 12 val images, 3 classes" in log
    warnings = [l for l in proc.stderr.splitlines() if "already listed" in l]
    assert len(warnings) == 2, proc.stderr
    train_line = next(l for l in warnings if f"{root}/train: " in l)
    val_line = next(l for l in warnings if f"{root}/val: " in l)
    assert train_line.startswith("WARNING: ") and "skipped 2 path(s)" in train_line, train_line
    assert "class_0/loop" in train_line or "again.JPEG" in train_line
    assert "skipped 1 path(s)" in val_line and "class_1/up" in val_line, val_line
