"""First contact, continued: what a user meets on an ordinary first day. A model evaluated with --test-only is
evaluated at the size it was trained at, not at the defaults; a class folder that is a link to another class is
refused, one that links out of the data set is fine; a data path or a class name with a byte that is not UTF-8
(a Latin-1 file name on a UTF-8 system) is printed escaped and silences nothing. Real processes, real files,
real symlinks."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SMALL_RUN, assert_ok, assert_one_line_error, run_main, write_image_folder

import data as data_lib
import layout as layout_lib

PREPROCESSING_FLAGS = ("--train-crop-size", "--val-resize-size", "--val-crop-size", "--interpolation")


def without_sizes(args):
    """`args` without the preprocessing flags and their values (what a user who gives none passes)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in PREPROCESSING_FLAGS:
            skip = True
        else:
            out.append(arg)
    return out


BASE = [*without_sizes(SMALL_RUN), "--model", "densenet121", "--batch-size", "8"]  # no size flags
TINY = [*SMALL_RUN, "--model", "densenet121", "--batch-size", "8"]                 # 32 px
ENV = {"OMP_NUM_THREADS": "1"}


def last(pattern, text):
    found = re.findall(pattern, text, re.M)
    assert found, f"no {pattern!r} in:\n{text[-3000:]}"
    return found[-1]


def evaluation(stdout):
    """(Acc@1, loss) that the evaluation printed last, as printed."""
    return last(r"^ \* Acc@1 (\d+\.\d+) ", stdout), last(r"^Test: loss (\d+\.\d+),", stdout)


# Item 1: --test-only evaluates at the size the model was trained at ------------------------------------------

def test_test_only_evaluates_at_the_checkpoints_sizes_unless_flags_are_given(tmp_path):
    # A 64 px model evaluated with no size flags was evaluated at the defaults (resize 256, crop 224): another
    # Acc@1 than training reported, and nothing said so. The same model on the same images at the same size must
    # give the same numbers, exactly; the loss (4 decimals) tells sizes apart even where Acc@1 happens not to.
    root = write_image_folder(tmp_path / "data", classes=3, size=64)
    best = tmp_path / "out" / "model_best.pth"
    train = run_main(["--data-path", root, "--output-dir", str(tmp_path / "out"), *BASE, "--train-crop-size", "64",
                      "--val-resize-size", "64", "--val-crop-size", "64", "--epochs", "1", "--max-steps", "2",
                      "--lr", "0.01"], env=ENV)
    trained_acc1, trained_loss = evaluation(assert_ok(train))
    with open(tmp_path / "out" / "metrics.jsonl") as f:
        row = json.loads(f.read().splitlines()[-1])
    assert f"{row['val_acc1']:.3f}" == trained_acc1 and f"{row['val_loss']:.4f}" == trained_loss, row
    assert best.is_file()

    # Neither the sizes nor --model given (the checkpoint is a densenet121; the default is densenet201): both from
    # the checkpoint, as predict.py and export_onnx.py read them. (Before: the wrong size, then the wrong model.)
    no_model = [a for a in BASE if a not in ("--model", "densenet121")]
    evaluated = run_main(["--data-path", root, "--output-dir", str(tmp_path / "eval"), *no_model, "--test-only",
                          "--resume", str(best)], env=ENV)
    log = assert_ok(evaluated)
    assert evaluation(log) == (trained_acc1, trained_loss), log
    said = last(r"^From .*$", log)
    assert said.startswith(f"From {best} (the flags were not given): --model densenet121, ") \
        and "--val-resize-size 64" in said and "--val-crop-size 64" in said and "--train-crop-size 64" in said, said
    assert "Model: densenet121, 3 classes" in log, log

    # Flags given win over the checkpoint; only the ones not given come from it.
    flagged = run_main(["--data-path", root, "--output-dir", str(tmp_path / "eval2"), *BASE, "--test-only",
                        "--resume", str(best), "--val-resize-size", "40", "--val-crop-size", "32"], env=ENV)
    log = assert_ok(flagged)
    said = last(r"^From .*$", log)
    assert "--model" not in said and "--train-crop-size 64" in said and "--val-resize-size" not in said and "--val-crop-size" not in said, said
    assert evaluation(log)[1] != trained_loss, log  # evaluated at 32 px: another loss than at 64 px


# Item 2: a class folder that is another class folder -----------------------------------------------------------

def link_class(root, split, link="class_2", target="class_1"):
    """root/split/<link> becomes a symlink to its sibling <target> (relative, as `ln -s class_1 class_2`)."""
    shutil.rmtree(os.path.join(root, split, link))
    os.symlink(target, os.path.join(root, split, link))
    return os.path.join(root, split, target), os.path.join(root, split, link)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_class_folder_linked_to_another_class_is_one_line_error(tmp_path, split):
    # train/class_2 -> class_1 read as "48 train / 12 val images, 3 classes", exit 0: the same images learned
    # and evaluated under two labels. Refused before any work, naming both folders; the other split is intact.
    root = write_image_folder(tmp_path / "data", classes=3, size=32)
    target, link = link_class(root, split)
    proc = run_main(["--data-path", root, "--output-dir", str(tmp_path / "out"), *TINY, "--epochs", "1",
                     "--max-steps", "1"], env=ENV)
    assert_one_line_error(proc, f"class folders {target} and {link} are one folder ({link} is a link to {target})")
    assert proc.returncode == 2 and "Epoch" not in proc.stdout and not os.path.exists(tmp_path / "out" / "run.json")


def flat_val(root):
    """root's val/<class>/<image> flattened into val/<image>_<class>.JPEG (a layout of its own)."""
    val = os.path.join(root, "val")
    for name in os.listdir(val):
        for image in os.listdir(os.path.join(val, name)):
            os.rename(os.path.join(val, name, image), os.path.join(val, f"{os.path.splitext(image)[0]}_{name}.JPEG"))
        os.rmdir(os.path.join(val, name))
    return root


def as_kaggle(root):
    """root's train/ moved to the Kaggle download's ILSVRC/Data/CLS-LOC/train/, val/ flat with a CSV."""
    base = os.path.join(root, layout_lib.KAGGLE_SUBDIR)
    os.makedirs(os.path.join(base, "val"))
    os.rename(os.path.join(root, "train"), os.path.join(base, "train"))
    rows = []
    for name in sorted(os.listdir(os.path.join(root, "val"))):
        for image in sorted(os.listdir(os.path.join(root, "val", name))):
            image_id = f"ILSVRC2012_val_{len(rows) + 1:08d}"
            os.rename(os.path.join(root, "val", name, image), os.path.join(base, "val", image_id + ".JPEG"))
            rows.append(f"{image_id},{name} 0 0 10 10\n")
    shutil.rmtree(os.path.join(root, "val"))
    with open(os.path.join(root, layout_lib.KAGGLE_VAL_CSV), "w") as f:
        f.writelines(["ImageId,PredictionString\n", *rows])
    return base


def test_class_folder_links_between_classes_are_refused_in_every_layout(tmp_path):
    # The check is in the layout itself (list_classes / scan_classes), so every layout and the training set's own
    # scan refuse it: the Kaggle download's train/, a train/ beside a flat val/, two links to one outside folder.
    flat = flat_val(write_image_folder(tmp_path / "flat", classes=3, train_per_class=2, val_per_class=1, size=8))
    target, link = link_class(flat, "train")
    with pytest.raises(layout_lib.DataError, match=f"class folders {re.escape(target)} and {re.escape(link)} are"):
        layout_lib.find_layout(flat)

    kaggle = write_image_folder(tmp_path / "kaggle", classes=3, train_per_class=2, val_per_class=1, size=8)
    base = as_kaggle(kaggle)
    assert layout_lib.find_layout(kaggle).kind.startswith("Kaggle")  # the layout is read before the link is made
    target, link = link_class(base, "train", link="class_0", target="class_2")  # the link sorts first
    with pytest.raises(layout_lib.DataError, match=f"class folders {re.escape(link)} and {re.escape(target)} are "
                                                   f"one folder \\({re.escape(link)} is a link to"):
        layout_lib.find_layout(kaggle)
    with pytest.raises(layout_lib.DataError, match="are one folder"):
        data_lib.ImageFolderDataset(os.path.join(base, "train"), transform=None)
    with pytest.raises(layout_lib.DataError, match="are one folder"):
        layout_lib.scan_classes(os.path.join(base, "train"), ["class_0", "class_1", "class_2"])

    pool = write_image_folder(tmp_path / "pool", classes=1, train_per_class=2, val_per_class=1, size=8)
    twice = write_image_folder(tmp_path / "twice", classes=3, train_per_class=2, val_per_class=1, size=8)
    for name in ("class_0", "class_1"):
        shutil.rmtree(os.path.join(twice, "val", name))
        os.symlink(os.path.join(pool, "val", "class_0"), os.path.join(twice, "val", name))
    with pytest.raises(layout_lib.DataError, match=f"both lead to {re.escape(os.path.join(pool, 'val', 'class_0'))}"):
        layout_lib.find_layout(twice)


def test_class_folders_linked_from_outside_the_data_set_train_and_evaluate(tmp_path):
    # A common way to assemble a data set: every class folder a link to a folder elsewhere. Each is one folder of
    # its own: every image once, no warning.
    pool = write_image_folder(tmp_path / "pool", classes=3, size=32)
    root = tmp_path / "assembled"
    for split in ("train", "val"):
        os.makedirs(root / split)
        for name in ("class_0", "class_1", "class_2"):
            os.symlink(os.path.join(pool, split, name), root / split / name)
    proc = run_main(["--data-path", str(root), "--output-dir", str(tmp_path / "out"), *TINY, "--epochs", "1",
                     "--max-steps", "1"], env=ENV)
    log = assert_ok(proc)
    assert "Data: 24 train / 12 val images, 3 classes" in log and " * Acc@1 " in log
    assert "WARNING" not in proc.stderr and "warning" not in proc.stderr, proc.stderr


def test_an_image_linked_into_a_second_class_is_used_once(tmp_path):
    # The file-level form of the same mistake: class_1/dup.JPEG -> ../class_0/img_0.JPEG put one image under two
    # labels, counted twice and unreported. It stays in the first class, and the scan reports the second path as
    # repeated (data.build warns with describe_repeats), as a second name for a file within one class already was.
    root = write_image_folder(tmp_path / "data", classes=3, train_per_class=4, val_per_class=2, size=8)
    for split in ("train", "val"):
        os.symlink(os.path.join("..", "class_0", "img_0.JPEG"), os.path.join(root, split, "class_1", "dup.JPEG"))
    train = data_lib.ImageFolderDataset(os.path.join(root, "train"), transform=None)
    assert len(train.samples) == 12 and train.scan.repeated == [os.path.join(root, "train", "class_1", "dup.JPEG")]
    assert (os.path.join(root, "train", "class_0", "img_0.JPEG"), 0) in train.samples
    found = layout_lib.find_layout(root)
    assert len(found.val_samples) == 6 and found.val_scan.repeated == [os.path.join(root, "val", "class_1", "dup.JPEG")]
    assert "skipped 1 path(s)" in layout_lib.describe_repeats(found.val_scan, found.val_root)


# Item 3: a path with a byte that is not UTF-8 ------------------------------------------------------------------

def run_bytes(args, env_extra=None):
    """main.py ARGS as a user on a UTF-8 locale runs it; output kept as bytes, to see exactly what was written."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "PYTHONUTF8")}
    env.update(ENV, LANG="C.UTF-8", LC_ALL="C.UTF-8", **(env_extra or {}))
    return subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *args], cwd=REPO, env=env,
                          capture_output=True, timeout=600)


def utf8(data, what):
    """`data` decoded as UTF-8, strictly: a raw byte that is not UTF-8 on the terminal or in the log fails here."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AssertionError(f"{what} is not valid UTF-8 ({e}):\n{data[-3000:]!r}") from None


def escaped(path):
    """How the output prints a path with undecodable bytes: each as a backslash escape (\\udce9), in plain ASCII."""
    return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")


def test_a_data_path_that_is_not_utf8_is_printed_escaped_and_silences_nothing(tmp_path):
    # --data-path .../caf\xe9/data: the first print of the path raised an encoding error taken for a dead stdout,
    # and every later line (steps, Acc@1, the summary) was dropped from the terminal and from --log-file; exit 0.
    folder = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    os.makedirs(folder)
    os.rename(write_image_folder(tmp_path / "plain", classes=3, size=32).encode(), os.path.join(folder, b"data"))
    root, out, log_file = os.path.join(folder, b"data"), os.path.join(folder, b"out"), tmp_path / "train.log"
    proc = run_bytes(["--data-path", root, "--output-dir", out, "--log-file", str(log_file), *TINY, "--epochs", "1",
                      "--max-steps", "2"])
    stdout, stderr = utf8(proc.stdout, "stdout"), utf8(proc.stderr, "stderr")
    assert proc.returncode == 0 and "Traceback" not in stderr, f"exit {proc.returncode}\n{stdout}\n{stderr}"
    log = utf8(log_file.read_bytes(), "the --log-file")
    name = escaped(root)
    assert "\\udce9" in name and "\xe9" not in name  # an escape, in ASCII
    for where, text in (("stdout", stdout), ("--log-file", log)):
        assert len(re.findall(r"^Epoch: \[0\]", text, re.M)) == 2, f"{where}:\n{text}"
        assert re.search(r"^ \* Acc@1 \d+\.\d+ ", text, re.M) and "Run summary" in text, f"{where}:\n{text}"
        assert f"from {name} (layout:" in text, f"{where}:\n{text}"
        assert "cannot be written" not in text, f"{where}:\n{text}"
    assert "cannot be written" not in stderr, stderr
    assert os.path.isfile(os.path.join(out, b"model_best.pth")) and os.path.isfile(os.path.join(out, b"metrics.jsonl"))


def test_a_class_name_that_is_not_utf8_trains_saves_and_evaluates(tmp_path):
    # train/caf\xe9/: the class name is a str with a surrogate (os.fsdecode), saved in checkpoints among the
    # class names; the run must train and save, and its checkpoint must evaluate with --test-only --resume.
    root = write_image_folder(tmp_path / "data", classes=3, size=32)
    for split in ("train", "val"):
        os.rename(os.path.join(os.fsencode(root), split.encode(), b"class_1"),
                  os.path.join(os.fsencode(root), split.encode(), b"caf\xe9"))
    out = tmp_path / "out"
    proc = run_bytes(["--data-path", root, "--output-dir", str(out), *TINY, "--epochs", "1", "--max-steps", "2"])
    stdout, stderr = utf8(proc.stdout, "stdout"), utf8(proc.stderr, "stderr")
    assert proc.returncode == 0 and "Traceback" not in stderr, f"exit {proc.returncode}\n{stdout}\n{stderr}"
    assert "Data: 24 train / 12 val images, 3 classes" in stdout
    trained = evaluation(stdout)
    saved = torch.load(out / "model_best.pth", map_location="cpu", weights_only=False)
    assert saved["classes"] == ["caf\udce9", "class_0", "class_2"], saved["classes"]

    proc = run_bytes(["--data-path", root, "--output-dir", str(tmp_path / "eval"), *TINY, "--test-only",
                      "--resume", str(out / "model_best.pth")])
    stdout, stderr = utf8(proc.stdout, "stdout"), utf8(proc.stderr, "stderr")
    assert proc.returncode == 0 and "Traceback" not in stderr, f"exit {proc.returncode}\n{stdout}\n{stderr}"
    assert evaluation(stdout) == trained, stdout
