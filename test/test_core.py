"""Tests for the core trainer: argument parsing, eval preprocessing against torchvision, the learning-rate
schedule, real end-to-end runs of main.py on a tiny image folder (train, eval, checkpoint, resume, test-only),
the 1p launcher's summary, and the one-line errors for bad inputs.

Model equivalence with torchvision is tested in test_densenet.py.
Every run here is a real subprocess on real image files (tiny: 3 classes, 32 px, densenet121, batch 8).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import (REPO, SMALL_RUN, assert_ok, assert_one_line_error, run_main, run_script,  # noqa: E402
                      write_image_folder)

sys.path.insert(0, REPO)
import cli  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import densenet  # noqa: E402
import device as device_lib  # noqa: E402
import main  # noqa: E402
import trainer  # noqa: E402

# Tiny inputs gain nothing from threads, and on a small shared machine oversubscribed OpenMP threads are
# many times slower; subprocesses get one thread unless the caller chose otherwise.
ENV = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
TINY = ["--model", "densenet121", *SMALL_RUN, "--batch-size", "8"]
CLASSES = ["class_0", "class_1", "class_2"]
NUM = r"(\d+(?:\.\d+)?)"


def parse(*argv):
    return main.get_args_parser().parse_args(list(argv))


def train(data_path, out, *extra):
    return run_main(["--data-path", data_path, "--output-dir", str(out), *TINY, *extra], env=ENV)


def step_lines(log, epoch):
    return re.findall(rf"^Epoch: \[{epoch}\]\s+\[\s*(\d+)/(\d+)\].*$", log, re.M)


def acc_lines(log):
    return re.findall(rf"^ \* Acc@1 {NUM} Acc@5 {NUM} \((\d+) images\)$", log, re.M)


# ----------------------------------------------------------------------------
# 1. Argument parsing: the reference's flags, with their spellings
# ----------------------------------------------------------------------------

def test_parser_defaults():
    a = parse()
    # Not given: a resumed or --test-only run takes them from its checkpoint, a fresh one from these defaults.
    assert (a.model, a.train_crop_size, a.val_resize_size, a.val_crop_size, a.interpolation) == (None,) * 5
    config.resolve_from_checkpoint(a)
    assert (a.model, a.train_crop_size, a.val_resize_size, a.val_crop_size, a.interpolation) == \
        ("densenet201", 224, 256, 224, "bilinear")
    assert a.device == "auto"
    assert a.data_path is None and a.resume == "" and a.start_epoch == 0
    assert not (a.test_only or a.pretrained or a.amp or a.apex or a.distributed)
    assert a.lr_scheduler == "step" and a.max_steps is None


def test_parser_reference_flags_land_in_their_dest():
    a = parse("--data_path", "/d", "--model", "densenet121", "-j", "3", "--epochs", "7", "-b", "64",
              "--lr", "0.05", "--momentum", "0.8", "--wd", "5e-5", "--lr-step-size", "11", "--lr-gamma", "0.2",
              "--print-freq", "3", "--output-dir", "/o", "--resume", "/o/c.pth", "--start-epoch", "4",
              "--test-only", "--pretrained", "--pretrained_weight_path", "/w.pth", "--num_classes", "10",
              "--seed", "7", "--device_id", "2", "--amp", "--apex", "--apex-opt-level", "O1",
              "--loss_scale_value", "1024", "--distributed", "--world-size", "8", "--dist-url", "tcp://h:1",
              "--dist_rank", "1", "--device_ids", "0,1,2,3", "--device", "npu", "--train-crop-size", "176",
              "--val-resize-size", "232", "--val-crop-size", "200", "--lr-scheduler", "cosine",
              "--lr-warmup-epochs", "2.5", "--label-smoothing", "0.1", "--max-steps", "20")
    expected = dict(data_path="/d", model="densenet121", workers=3, epochs=7, batch_size=64, lr=0.05,
                    momentum=0.8, weight_decay=5e-5, lr_step_size=11, lr_gamma=0.2, print_freq=3, output_dir="/o",
                    resume="/o/c.pth", start_epoch=4, test_only=True, pretrained=True,
                    pretrained_weight_path="/w.pth", num_classes=10, seed=7, device_id=2, amp=True, apex=True,
                    apex_opt_level="O1", loss_scale_value="1024", distributed=True, world_size=8,
                    dist_url="tcp://h:1", dist_rank=1, device_ids="0,1,2,3", device="npu", train_crop_size=176,
                    val_resize_size=232, val_crop_size=200, lr_scheduler="cosine", lr_warmup_epochs=2.5,
                    label_smoothing=0.1, max_steps=20)
    got = {k: getattr(a, k) for k in expected}
    assert got == expected
    assert isinstance(a.lr_warmup_epochs, float) and isinstance(a.workers, int)


@pytest.mark.parametrize("spellings, dest, value, parsed", [
    (("--data-path", "--data_path"), "data_path", "/x", "/x"),
    (("-j", "--workers"), "workers", "5", 5),
    (("-b", "--batch-size"), "batch_size", "16", 16),
    (("--wd", "--weight-decay"), "weight_decay", "0.001", 0.001),
])
def test_parser_alias_spellings(spellings, dest, value, parsed):
    for flag in spellings:
        assert getattr(parse(flag, value), dest) == parsed, flag
        assert getattr(parse(f"{flag}={value}") if flag.startswith("--") else parse(flag + value), dest) == parsed


@pytest.mark.parametrize("device", ["auto", "npu", "cuda", "cpu"])
def test_device_choices_resolve_or_fail_in_one_line(device):
    """Every --device choice either binds a device of that type or says in one line what is missing."""
    requested = parse("--device", device).device
    try:
        got = device_lib.resolve_device(requested)
    except device_lib.DeviceError as e:
        assert device in ("npu", "cuda"), e  # auto and cpu always find a device
        assert f"--device {device}" in str(e) and "\n" not in str(e)
        assert isinstance(e, cli.UserError)  # one line on stderr, exit code 2
        return
    if device == "auto":
        assert got.type in ("npu", "cuda", "cpu")
        assert got.type == "cpu" or got.is_accelerator
    else:
        assert got.type == device


def test_parser_rejects_unknown_device_and_model(capsys):
    for argv in (["--device", "tpu"], ["--model", "resnet50"]):
        with pytest.raises(SystemExit) as e:
            parse(*argv)
        assert e.value.code == 2
        assert "invalid choice" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# 2. Eval preprocessing: bit-identical to torchvision's ImageNet eval preset
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """Real files of odd sizes and modes (RGB/gray/palette/CMYK; JPEG and PNG; up- and down-scaling)."""
    root = tmp_path_factory.mktemp("odd_images")
    rng = np.random.default_rng(1)
    paths = []

    def save(name, pixels, mode=None, fmt=None, convert=None):
        img = Image.fromarray(pixels, mode) if mode else Image.fromarray(pixels)
        if convert:
            img = img.convert(convert)
        path = str(root / name)
        img.save(path, format=fmt)
        paths.append(path)

    # smooth gradient plus noise: exercises the resampling filter, not only flat colour
    def rgb(h, w):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([255 * xx / w, 255 * yy / h, 128 + 0 * xx], -1)
        return np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)

    save("rgb_300x200.jpg", rgb(200, 300), fmt="JPEG")
    save("rgb_97x131.png", rgb(131, 97), fmt="PNG")
    save("gray_150x90.jpg", rgb(90, 150)[..., 0], fmt="JPEG")
    save("gray_61x257.png", rgb(257, 61)[..., 1], fmt="PNG")
    save("palette_120x80.png", rgb(80, 120), fmt="PNG", convert="P")
    save("cmyk_210x333.jpg", rgb(333, 210), fmt="JPEG", convert="CMYK")
    return paths


def ours(path, resize, crop, channels_last):
    normalize = data.DeviceNormalize(torch.device("cpu"), channels_last=channels_last)
    return normalize(torch.stack([data.eval_transform(resize, crop)(data.load_rgb(path))]))


def reference(preset, path):
    with Image.open(path) as img:  # as torchvision's ImageFolder loads: PIL, converted to RGB
        return preset(img.convert("RGB")).unsqueeze(0)


def test_densenet201_preset_is_what_we_compare_against():
    preset = torchvision.models.DenseNet201_Weights.IMAGENET1K_V1.transforms()
    assert isinstance(preset, ImageClassification)
    assert preset.resize_size == [256] and preset.crop_size == [224]
    assert preset.interpolation == InterpolationMode.BILINEAR and preset.antialias is True
    assert tuple(preset.mean) == data.IMAGENET_MEAN and tuple(preset.std) == data.IMAGENET_STD


@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_preprocessing_bit_identical_to_torchvision_224(odd_images, channels_last):
    preset = torchvision.models.DenseNet201_Weights.IMAGENET1K_V1.transforms()
    for path in odd_images:
        got, want = ours(path, 256, 224, channels_last), reference(preset, path)
        assert got.shape == want.shape == (1, 3, 224, 224), path
        assert got.dtype == torch.float32
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.equal(got, want), f"{os.path.basename(path)}: max diff {(got - want).abs().max().item()}"


@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_preprocessing_bit_identical_to_torchvision_other_sizes(odd_images, channels_last):
    preset = ImageClassification(crop_size=56, resize_size=64)
    for path in odd_images:
        got, want = ours(path, 64, 56, channels_last), reference(preset, path)
        assert got.shape == (1, 3, 56, 56), path
        assert torch.equal(got, want), f"{os.path.basename(path)}: max diff {(got - want).abs().max().item()}"


def test_eval_loader_batches_match_torchvision(tmp_path):
    """The real validation path: ImageFolderDataset -> DataLoader (collate) -> DeviceNormalize."""
    root = write_image_folder(tmp_path / "d", classes=2, train_per_class=1, val_per_class=3, size=50)
    val = data.ImageFolderDataset(os.path.join(root, "val"), data.eval_transform(64, 56))
    loader = data.make_loader(val, data.ExactEvalSampler(len(val)), 4, 0, False, 0)
    preset = ImageClassification(crop_size=56, resize_size=64)
    normalize = data.DeviceNormalize(torch.device("cpu"), channels_last=True)
    seen = 0
    for batch in loader:
        assert batch.images.dtype == torch.uint8 and not batch.bad
        got = normalize(batch.images)
        paths = [val.samples[i] for i in range(seen, seen + len(got))]
        want = torch.cat([reference(preset, p) for p, _ in paths])
        assert torch.equal(got, want)
        assert batch.targets.tolist() == [t for _, t in paths]
        seen += len(got)
    assert seen == 6


# ----------------------------------------------------------------------------
# 3. Learning-rate schedule, in closed form
# ----------------------------------------------------------------------------

def test_lr_step():
    a = parse("--lr", "0.1", "--lr-step-size", "30", "--lr-gamma", "0.1")
    lr = lambda e: trainer.learning_rate(a, e)  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(29.99) == pytest.approx(0.1)
    assert lr(30) == pytest.approx(0.01) and lr(59.5) == pytest.approx(0.01)
    assert lr(60) == pytest.approx(0.001) and lr(89.9) == pytest.approx(0.001)
    b = parse("--lr", "0.4", "--lr-step-size", "2", "--lr-gamma", "0.5")
    assert [trainer.learning_rate(b, e) for e in (0, 1.9, 2, 4, 6.5)] == pytest.approx([0.4, 0.4, 0.2, 0.1, 0.05])


def test_lr_cosine():
    a = parse("--lr", "0.1", "--lr-scheduler", "cosine", "--epochs", "10")
    assert trainer.learning_rate(a, 0) == pytest.approx(0.1)
    assert trainer.learning_rate(a, 5) == pytest.approx(0.05)
    assert trainer.learning_rate(a, 2.5) == pytest.approx(0.05 * (1 + np.cos(np.pi / 4)))
    assert trainer.learning_rate(a, 10) == pytest.approx(0.0, abs=1e-12)
    b = parse("--lr", "0.1", "--lr-scheduler", "cosine", "--epochs", "10", "--lr-min", "0.001")
    assert trainer.learning_rate(b, 10) == pytest.approx(0.001)
    assert trainer.learning_rate(b, 5) == pytest.approx(0.001 + 0.099 * 0.5)


def test_lr_linear_warmup():
    a = parse("--lr", "0.1", "--lr-warmup-epochs", "2", "--lr-warmup-decay", "0.01", "--lr-step-size", "3",
              "--lr-gamma", "0.1")
    assert trainer.learning_rate(a, 0) == pytest.approx(0.1 * 0.01)
    assert trainer.learning_rate(a, 1) == pytest.approx(0.1 * (0.01 + 0.99 * 0.5))
    assert trainer.learning_rate(a, 1.999) < 0.1
    assert trainer.learning_rate(a, 2) == pytest.approx(0.1)  # warm-up ends at the full lr
    assert trainer.learning_rate(a, 4.9) == pytest.approx(0.1)  # the step schedule counts from the warm-up's end
    assert trainer.learning_rate(a, 5) == pytest.approx(0.01)
    lrs = [trainer.learning_rate(a, e / 10) for e in range(21)]
    assert all(x < y for x, y in zip(lrs, lrs[1:])), lrs  # strictly increasing through the warm-up
    c = parse("--lr", "0.1", "--lr-warmup-epochs", "2", "--lr-scheduler", "cosine", "--epochs", "12")
    assert trainer.learning_rate(c, 2) == pytest.approx(0.1)
    assert trainer.learning_rate(c, 7) == pytest.approx(0.05)  # cosine spans epochs 2..12
    assert trainer.learning_rate(c, 12) == pytest.approx(0.0, abs=1e-12)
    d = parse("--lr", "0.1", "--lr-warmup-epochs", "1", "--lr-warmup-method", "constant", "--lr-warmup-decay", "0.1")
    assert trainer.learning_rate(d, 0) == pytest.approx(0.01) and trainer.learning_rate(d, 0.9) == pytest.approx(0.01)
    assert trainer.learning_rate(d, 1) == pytest.approx(0.1)


# ----------------------------------------------------------------------------
# 4-5. End to end on a tiny folder: train, eval, checkpoint, resume, test-only
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("tiny") / "data")  # 3 classes x 8 train / 4 val


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """One 2-epoch run shared by the tests that inspect, resume or evaluate it."""
    out = tmp_path_factory.mktemp("run")
    # --keep-checkpoints all: every epoch's model_<epoch>.pth, as torchvision (by default only the latest and best)
    proc = train(tiny_data, out, "--epochs", "2", "--deterministic", "--keep-checkpoints", "all")
    assert_ok(proc)
    return out, proc


def test_train_log(trained):
    out, proc = trained
    log = proc.stdout
    for epoch in (0, 1):
        steps = step_lines(log, epoch)
        assert [int(s) for s, _ in steps] == [1, 2, 3] and {int(n) for _, n in steps} == {3}, log
        fps = re.search(rf"^Train \[{epoch}\] FPS: {NUM} img/s", log, re.M)
        assert fps and float(fps.group(1)) > 0, log
        assert re.search(rf"^Train \[{epoch}\] done in .*images 24", log, re.M), log
    line = re.search(r"^Epoch: \[0\]\s+\[1/3\].*$", log, re.M).group(0)
    for field in ("eta: ", "lr: ", "img/s: ", "loss: ", "acc1: ", "acc5: "):
        assert re.search(re.escape(field) + r"[\d:.]+", line), (field, line)
    accs = acc_lines(log)
    assert len(accs) == 2 and all(n == "12" for *_, n in accs), log
    assert all(0 <= float(a1) <= float(a5) <= 100 for a1, a5, _ in accs)
    assert "Data: 24 train / 12 val images, 3 classes" in log


def test_train_outputs(trained):
    out, _ = trained
    for name in ("checkpoint.pth", "model_0.pth", "model_1.pth", "model_best.pth", "metrics.jsonl"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    for r in records:
        assert r["images"] == 24 and 0 <= r["val_acc1"] <= 100 and r["val_images"] == 12
        assert np.isfinite(r["train_loss"]) and r["fps"] > 0

    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    # The original's keys that mean something here ('lr_scheduler' does not: the LR is computed from the epoch).
    assert {"model", "optimizer", "epoch", "args", "classes", "position"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["classes"] == CLASSES
    assert type(ckpt["args"]) is dict and ckpt["args"]["model"] == "densenet121" and ckpt["args"]["epochs"] == 2
    model = densenet.build_model("densenet121", num_classes=3)
    model.load_state_dict(ckpt["model"])  # strict: every key and shape matches
    assert torch.load(out / "model_0.pth", weights_only=True)["epoch"] == 0
    assert torch.load(out / "model_1.pth", weights_only=True)["epoch"] == 1
    assert os.stat(out / "model_1.pth").st_ino == os.stat(out / "checkpoint.pth").st_ino  # a hard link, no copy
    best = torch.load(out / "model_best.pth", weights_only=True)
    assert best["classes"] == CLASSES and best["model"].keys() == ckpt["model"].keys()
    assert best["best_acc1"] == pytest.approx(max(r["val_acc1"] for r in records))


def test_resume_from_epoch_checkpoint(trained, tiny_data, tmp_path):
    out, _ = trained
    proc = train(tiny_data, tmp_path, "--resume", str(out / "model_0.pth"), "--epochs", "2", "--deterministic")
    assert_ok(proc)
    log = proc.stdout
    assert re.search(r"^Resumed from .*model_0\.pth: weights after epoch 0; continuing at epoch 1, step 0$", log,
                     re.M), log
    assert "Epoch: [0]" not in log, log
    assert [int(s) for s, _ in step_lines(log, 1)] == [1, 2, 3], log
    assert len(acc_lines(log)) == 1
    # The default keeps checkpoint.pth (and model_best.pth), no model_<epoch>.pth.
    assert not [n for n in os.listdir(tmp_path) if re.fullmatch(r"model_\d+\.pth", n)]
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 1
    resumed = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    original = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in resumed] == [1]
    # Same weights, optimizer state, data order, crops and RNG: epoch 1 repeats bit for bit (CPU, --deterministic).
    assert resumed[0]["train_loss"] == original[1]["train_loss"]
    assert resumed[0]["val_acc1"] == original[1]["val_acc1"]


def test_test_only_evaluates_and_trains_nothing(trained, tiny_data, tmp_path):
    out, train_proc = trained
    proc = train(tiny_data, tmp_path, "--test-only", "--resume", str(out / "checkpoint.pth"))
    assert_ok(proc)
    log = proc.stdout
    accs = acc_lines(log)
    assert len(accs) == 1 and accs[0][2] == "12", log
    assert accs[0] == acc_lines(train_proc.stdout)[-1]  # the same weights score the same on the same images
    assert "Epoch: [" not in log and "Start training" not in log, log
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".pth") or n == "metrics.jsonl"]


def test_resume_on_other_classes_is_one_line_error(trained, tmp_path):
    """Same number of classes, other names: the checkpoint's outputs would be mislabelled, so refuse."""
    out, _ = trained
    root = write_image_folder(tmp_path / "data", train_per_class=3, val_per_class=1)  # 9 images: a batch of 8 fits
    for split in ("train", "val"):
        os.rename(os.path.join(root, split, "class_2"), os.path.join(root, split, "class_Z"))
    proc = run_main(["--data-path", root, "--output-dir", str(tmp_path / "out"), *TINY, "--epochs", "3",
                     "--resume", str(out / "checkpoint.pth")], env=ENV)
    assert_one_line_error(proc, "trained on other classes")
    assert "class_2" in proc.stderr and "class_Z" in proc.stderr
    assert "Epoch: [" not in proc.stdout and "Acc@1" not in proc.stdout


def test_resume_auto(tiny_data, tmp_path):
    proc = train(tiny_data, tmp_path, "--resume", "auto", "--epochs", "1", "--max-steps", "1")
    assert_ok(proc)
    assert f"--resume auto: no checkpoint in {tmp_path}, starting fresh" in proc.stdout
    assert "Resumed from" not in proc.stdout
    assert step_lines(proc.stdout, 0) == [("1", "1")]
    assert (tmp_path / "checkpoint.pth").is_file()

    again = train(tiny_data, tmp_path, "--resume", "auto", "--epochs", "2", "--max-steps", "1")
    assert_ok(again)
    assert "starting fresh" not in again.stdout
    assert re.search(r"^Resumed from .*(checkpoint|model_0)\.pth: weights after epoch 0; continuing at epoch 1, "
                     r"step 0$", again.stdout, re.M), again.stdout
    assert "Epoch: [0]" not in again.stdout and step_lines(again.stdout, 1) == [("1", "1")]
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_max_steps_stops_each_epoch(tiny_data, tmp_path):
    proc = train(tiny_data, tmp_path, "--epochs", "2", "--max-steps", "2", "--warmup-steps", "0")
    assert_ok(proc)
    for epoch in (0, 1):
        assert step_lines(proc.stdout, epoch) == [("1", "2"), ("2", "2")], proc.stdout  # 24 images = 3 batches
        assert re.search(rf"^Train \[{epoch}\] done in .*images 16 ", proc.stdout, re.M), proc.stdout
        # --warmup-steps 0: every step is timed (FPS over steps 1-2), not "n/a"
        assert re.search(rf"^Train \[{epoch}\] FPS: {NUM} img/s \(steady state: steps 1-2 of 2, 16 images",
                         proc.stdout, re.M), proc.stdout
    assert len(acc_lines(proc.stdout)) == 2  # evaluation stays complete


# ----------------------------------------------------------------------------
# 6. Clear one-line errors
# ----------------------------------------------------------------------------

def _without(root, split):
    shutil.rmtree(os.path.join(root, split))
    return root


def _val_class_renamed(root):
    os.rename(os.path.join(root, "val", "class_2"), os.path.join(root, "val", "class_X"))
    return root


def _train_emptied(root):
    shutil.rmtree(os.path.join(root, "train"))
    os.makedirs(os.path.join(root, "train"))
    return root


def _train_without_images(root):
    for c in CLASSES:
        folder = os.path.join(root, "train", c)
        for n in os.listdir(folder):
            os.remove(os.path.join(folder, n))
    with open(os.path.join(root, "train", "class_0", "notes.txt"), "w") as f:
        f.write("not an image")
    return root


ERROR_CASES = {  # id: (how to break the tiny folder, extra flags, fragments the one-line error must contain)
    "missing-data-path": (lambda root: root + "_missing", [], ["no such directory", "_missing"]),
    "no-train": (lambda root: _without(root, "train"), [], ["missing 'train/'"]),
    "no-val": (lambda root: _without(root, "val"), [], ["missing 'val/'"]),
    "val-classes-differ": (_val_class_renamed, [], ["val classes differ from train classes", "class_2", "class_X"]),
    "empty-train": (_train_emptied, [], ["train has no class folders"]),
    "train-no-images": (_train_without_images, [], ["contains no image files"]),
    "test-only-no-weights": (None, ["--test-only"], ["--test-only needs weights"]),
    "test-only-auto-nothing": (None, ["--test-only", "--resume", "auto"], ["--resume auto: no checkpoint in"]),
    "resume-missing": (None, ["--resume", "/nonexistent/ckpt.pth"], ["/nonexistent/ckpt.pth", "no such file"]),
    "batch-size-0": (None, ["--batch-size", "0"], ["--batch-size must be > 0"]),
    "negative-epochs": (None, ["--epochs", "-1"], ["--epochs must be >= 0"]),
    "no-data-path": ("omit", [], ["no dataset", "--data-path"]),
}


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory):
    """Run every error case once, two at a time (each is mostly python/torch start-up: ~3 s of one core)."""
    def run_case(case_id):
        break_data, extra, _ = ERROR_CASES[case_id]
        tmp = tmp_path_factory.mktemp(case_id)
        root = write_image_folder(tmp / "data", train_per_class=1, val_per_class=1)
        data_args = [] if break_data == "omit" else ["--data-path", break_data(root) if break_data else root]
        out = tmp / "out"
        proc = run_main([*data_args, "--output-dir", str(out), *TINY, "--epochs", "1", *extra], env=ENV)
        return proc, out

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(ERROR_CASES, pool.map(run_case, ERROR_CASES)))


@pytest.mark.parametrize("case_id", list(ERROR_CASES))
def test_one_line_errors(error_runs, case_id):
    proc, out = error_runs[case_id]
    assert_one_line_error(proc)
    assert proc.returncode == cli.EXIT_USER_ERROR
    for fragment in ERROR_CASES[case_id][2]:
        assert fragment in proc.stderr, proc.stderr
    assert "Start training" not in proc.stdout and "Acc@1" not in proc.stdout
    assert not (out.exists() and [n for n in os.listdir(out) if n.endswith(".pth")])


# ----------------------------------------------------------------------------
# 7. The 1p launcher and its summary
# ----------------------------------------------------------------------------

@pytest.fixture
def launcher_id():
    """A device id of our own, so parallel runs of the launcher don't share test/output/<id>/."""
    device_id = str(900 + os.getpid() % 100)
    folder = os.path.join(REPO, "test", "output", device_id)
    shutil.rmtree(folder, ignore_errors=True)
    yield device_id, folder
    shutil.rmtree(folder, ignore_errors=True)


def test_train_full_1p_summary(tiny_data, launcher_id):
    device_id, folder = launcher_id
    # Run as users do, from their own folder with a relative --data_path (the launcher itself cd's to the repo).
    env = {k: v for k, v in os.environ.items() if k != "OUTPUT_ROOT"}
    env.update(ENV, ASCEND_DEVICE_ID=device_id)
    started = time.time()
    proc = subprocess.run(["bash", os.path.join(REPO, "test", "train_full_1p.sh"), "--data_path=data", "--epochs=1",
                           "--model", "densenet121", *SMALL_RUN, "--batch-size", "8"],
                          cwd=os.path.dirname(tiny_data), env=env, capture_output=True, text=True, timeout=900)
    wall = time.time() - started
    assert_ok(proc)
    stdout = proc.stdout
    final = dict(re.findall(r"^(Final Performance images/sec|Final Train Accuracy|E2E Training Duration sec) : (.*)$",
                            stdout, re.M))
    assert set(final) == {"Final Performance images/sec", "Final Train Accuracy", "E2E Training Duration sec"}, stdout

    log_path = os.path.join(folder, f"train_{device_id}.log")
    summary_path = os.path.join(folder, "DenseNet121_for_PyTorch_bs8_1p_acc.log")  # Network follows --model
    assert os.path.isfile(log_path) and os.path.isfile(summary_path), os.listdir(folder)
    with open(log_path) as f:
        log = f.read()
    assert step_lines(log, 0) and acc_lines(log), log  # the log file holds the run's output
    with open(summary_path) as f:
        summary = dict(line.split(" = ", 1) for line in f.read().splitlines())
    for key in ("Network", "RankSize", "BatchSize", "DeviceType", "CaseName", "ActualFPS", "TrainingTime",
                "TrainAccuracy", "ActualLoss", "E2ETrainingTime"):
        assert summary.get(key, "").strip(), (key, summary)
    assert summary["Network"] == "DenseNet121_for_PyTorch"
    assert summary["RankSize"] == "1" and summary["BatchSize"] == "8" and summary["DeviceType"] == "cpu"
    assert summary["CaseName"] == "DenseNet121_for_PyTorch_bs8_1p_acc"
    fps, acc = float(summary["ActualFPS"]), float(summary["TrainAccuracy"])
    assert fps > 0 and 0 <= acc <= 100
    assert float(summary["TrainingTime"]) == pytest.approx(8 * 1000 / fps, rel=1e-2)
    assert np.isfinite(float(summary["ActualLoss"]))
    # E2E: the launcher's whole run (whole seconds from `date +%s`): at least the epoch itself, at most our wall time
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        epoch_time = json.loads(f.read().splitlines()[-1])["epoch_time"]
    assert int(epoch_time) - 1 <= int(summary["E2ETrainingTime"]) <= wall + 1, (epoch_time, wall, summary)
    # the summary is the run's own numbers: last epoch FPS and last validation Acc@1
    assert fps == float(re.findall(rf"^Train \[0\] FPS: {NUM} img/s", log, re.M)[-1])
    assert acc == float(acc_lines(log)[-1][0])
    assert float(final["Final Performance images/sec"]) == fps and float(final["Final Train Accuracy"]) == acc
    assert int(final["E2E Training Duration sec"]) == int(summary["E2ETrainingTime"])


def test_launcher_without_data_path_fails_in_one_line(launcher_id):
    device_id, folder = launcher_id
    proc = run_script("train_full_1p.sh", ["--epochs=1"], env={**ENV, "ASCEND_DEVICE_ID": device_id}, timeout=60)
    assert_one_line_error(proc, "--data_path")
    assert not os.path.exists(folder)
