"""Reliability: a long run survives crashes, preemption, bad images and hostile checkpoints without losing work.

Every fault here is real: SIGKILL during checkpoint writes, SIGTERM mid-epoch, truncated/zero-byte/
not-an-image files, a pickle that would run code, a learning rate that truly blows the loss up, corrupt
checkpoints next to good ones. End-to-end cases run `python main.py` as a user would (densenet121 on
32 px images, a few dozen of them); unit cases use the helpers directly.
"""
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, SMALL_RUN, assert_ok, assert_one_line_error, run_main, write_image_folder

import checkpoint

import weights
import cli
import data as data_lib

# 3 classes x 16 train images, batch 4: 12 steps per epoch; 6 val images.
STEPS = 12
BASE = ["--model", "densenet121", *SMALL_RUN, "-b", "4", "--deterministic", "--seed", "7", "--lr", "0.01",
        "--lr-scheduler", "step",  # step schedule: the LR does not depend on --epochs
        # Dropout and mixup/cutmix draw from the trainer's global RNG, so a resume must restore it exactly
        # (augmentation is seeded per sample and would not notice).
        "--drop-rate", "0.1", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0"]
ENV = {"OMP_NUM_THREADS": "1"}


def train(data, out, *extra, env=None, timeout=600):
    return run_main(["--data-path", str(data), "--output-dir", str(out), *BASE, *extra],
                    env={**ENV, **(env or {})}, timeout=timeout)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(path_a, path_b):
    """Model tensors (BN running stats and num_batches_tracked included) and SGD momentum bit for bit."""
    a, b = load(path_a), load(path_b)
    assert (a["position"]["epoch"], a["position"]["step"]) == (b["position"]["epoch"], b["position"]["step"])
    assert a["model"].keys() == b["model"].keys()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"{len(different)} model tensors differ, e.g. {different[:5]}"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)


def step_numbers(log, epoch):
    return [int(s) for s in re.findall(rf"^Epoch: \[{epoch}\]\s+\[\s*(\d+)/{STEPS}\]", log, re.M)]


@pytest.fixture(scope="module")
def data48(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("rel") / "data", classes=3, train_per_class=16,
                              val_per_class=2, size=36)


@pytest.fixture(scope="module")
def reference(data48, tmp_path_factory):
    """Two epochs straight, never interrupted: what every resumed run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("reference")
    proc = train(data48, out, "--epochs", "2")
    assert_ok(proc)
    assert step_numbers(proc.stdout, 0) == list(range(1, STEPS + 1)), proc.stdout
    return out


# ----------------------------------------------------------------------------
# 1. SIGKILL while checkpoints are being written
# ----------------------------------------------------------------------------

def _save_forever(path, done):
    """Child: save ever newer ~6 MB states; `done` = the marker of the last save_atomic that returned."""
    torch.set_num_threads(1)  # as DataLoader workers do after a fork
    marker = 0
    while True:
        marker += 1
        state = {"marker": marker,
                 "weights": {f"w{i}": torch.full((256, 1024), float(marker)) for i in range(6)},
                 "tail": torch.full((1000,), float(marker))}  # every tensor carries the marker: no mixed saves
        checkpoint.save_atomic(state, path)
        done.value = marker


def test_sigkill_during_checkpoint_writes_never_leaves_a_broken_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    ctx = multiprocessing.get_context("fork")  # torch is already imported: the child starts writing at once
    rng = random.Random(0)
    killed_mid_write, previous = 0, 0
    for round_ in range(40):
        done = ctx.Value("q", 0, lock=False)
        child = ctx.Process(target=_save_forever, args=(path, done), daemon=True)
        child.start()
        # Wait until this child has replaced the file at least once, then kill it at a random moment.
        deadline = time.time() + 60
        while done.value < 1 and child.is_alive() and time.time() < deadline:
            time.sleep(0.002)
        assert child.is_alive() and done.value >= 1, "the writer did not start"
        time.sleep(rng.uniform(0, 0.15))
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL
        last_done = done.value

        state = torch.load(path, weights_only=True)  # must always load...
        marker = state["marker"]
        # ...and be the last completed save, or the one whose rename had happened when the kill landed.
        assert marker in (last_done, last_done + 1), (marker, last_done)
        assert sorted(state["weights"]) == [f"w{i}" for i in range(6)]
        assert all(torch.equal(w, torch.full((256, 1024), float(marker))) for w in state["weights"].values())
        assert torch.equal(state["tail"], torch.full((1000,), float(marker)))
        previous = marker

        strays = [n for n in os.listdir(tmp_path) if n != "checkpoint.pth"]
        assert all(n.startswith(".checkpoint.pth.") and n.endswith(".tmp") for n in strays), strays
        if strays:
            killed_mid_write += 1
            for n in strays:  # what a SIGKILL mid-write leaves behind: a hidden temp file, never the target
                os.remove(tmp_path / n)
        if killed_mid_write >= 5 and round_ >= 7:
            break
    assert killed_mid_write >= 3, f"only {killed_mid_write} kills landed inside a write"
    assert previous >= 1


def test_save_atomic_failure_keeps_previous_file(tmp_path):
    """An exception while writing (here: an unpicklable object) leaves the old checkpoint and no temp file."""
    path = tmp_path / "checkpoint.pth"
    checkpoint.save_atomic({"marker": 1, "w": torch.ones(3)}, str(path))
    before = path.read_bytes()
    with pytest.raises(Exception):
        checkpoint.save_atomic({"marker": 2, "w": torch.ones(3), "bad": lambda: None}, str(path))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


# ----------------------------------------------------------------------------
# 2. Bit-identical resume at an epoch boundary
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0])  # (with loader workers: the mid-epoch test below, SIGINT-to-group)
def test_resume_at_epoch_boundary_is_bit_identical(data48, reference, tmp_path, workers):
    w = ["--workers", str(workers)]
    first = train(data48, tmp_path, "--epochs", "1", *w)
    assert_ok(first)
    assert load(tmp_path / "checkpoint.pth")["position"]["epoch"] == 1
    second = train(data48, tmp_path, "--epochs", "2", "--resume", str(tmp_path / "checkpoint.pth"), *w)
    assert_ok(second)
    assert "Resumed from" in second.stdout and "epoch 1, step 0" in second.stdout, second.stdout
    assert step_numbers(second.stdout, 0) == [] and step_numbers(second.stdout, 1) == list(range(1, STEPS + 1))
    # workers 1 is compared with the workers-0 reference: augmentation does not depend on the worker count.
    assert_same_training_state(tmp_path / "checkpoint.pth", reference / "checkpoint.pth")


# ----------------------------------------------------------------------------
# 3. SIGTERM mid-epoch, then --resume auto
# ----------------------------------------------------------------------------

def start_main(args, env=None):
    return subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"), *args], cwd=REPO,
                            env={**os.environ, **ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def signal_after_step(proc, epoch, step, signum, whole_group=False, timeout=300):
    """Read the run's stdout until the line for `step` of `epoch`; then signal it. Returns (stdout, stderr)."""
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    stderr_chunks = []
    reader = threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    lines, sent = [], False
    pattern = re.compile(rf"^Epoch: \[{epoch}\]\s+\[\s*{step}/{STEPS}\]")
    try:
        for line in proc.stdout:
            lines.append(line)
            if not sent and pattern.match(line):
                if whole_group:  # as a cluster scheduler does: the trainer and its data loader workers
                    os.killpg(proc.pid, signum)
                else:
                    os.kill(proc.pid, signum)
                sent = True
        proc.wait()
    finally:
        timer.cancel()
    reader.join(30)
    assert sent, "".join(lines)
    return "".join(lines), "".join(stderr_chunks)


@pytest.mark.parametrize("signum, workers", [(signal.SIGTERM, 0), (signal.SIGINT, 1)],
                         ids=["SIGTERM-workers0", "SIGINT-to-group-workers1"])
def test_preempted_mid_epoch_then_resume_auto_is_bit_identical(data48, reference, tmp_path, signum, workers):
    args = ["--data-path", data48, "--output-dir", str(tmp_path), *BASE, "--epochs", "2", "--workers", str(workers)]
    proc = start_main(args)
    k = 3  # mid-epoch, with 9 steps of margin for a slow reader on a loaded machine
    out, err = signal_after_step(proc, 0, k, signum, whole_group=workers > 0)
    assert proc.returncode == 75, f"exit {proc.returncode}\n{out}\n{err}"
    m = re.search(r"^Preempted by (SIG\w+) at epoch 0 step (\d+): checkpoint saved", out, re.M)
    assert m and m.group(1) == signal.Signals(signum).name, out
    s = int(m.group(2))
    assert k <= s < STEPS, out  # the step in flight when the signal came is finished, no more
    assert max(step_numbers(out, 0)) == s
    assert "Traceback" not in err, err
    ckpt = load(tmp_path / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["position"]["epoch"], ckpt["position"]["step"]) == (0, 0, s)
    assert not (tmp_path / "model_0.pth").exists()  # no epoch-end file for an unfinished epoch

    if workers == 0:  # another batch size would skip next_step * (new batch) samples: refused, file untouched
        before = (tmp_path / "checkpoint.pth").read_bytes()
        other = run_main([*args, "--resume", "auto", "-b", "8"], env=ENV)
        assert_one_line_error(other, f"saved mid-epoch (epoch 0, step {s}) with --batch-size 4")
        assert (tmp_path / "checkpoint.pth").read_bytes() == before

    resumed = run_main([*args, "--resume", "auto"], env=ENV)
    assert_ok(resumed)
    assert f"epoch 0, step {s}" in resumed.stdout, resumed.stdout
    assert step_numbers(resumed.stdout, 0) == list(range(s + 1, STEPS + 1)), resumed.stdout
    assert re.search(rf"^Train \[0\] done .* images {4 * (STEPS - s)}\b", resumed.stdout, re.M), resumed.stdout
    assert_same_training_state(tmp_path / "checkpoint.pth", reference / "checkpoint.pth")


# ----------------------------------------------------------------------------
# 4. Bad data
# ----------------------------------------------------------------------------

BAD_FILES = ("truncated.jpg", "empty.jpg", "notes.jpg")
HIDDEN_FILES = (".DS_Store", "Thumbs.db", "._foo.jpg", ".hidden.jpg")


def write_bad_data(root):
    root = write_image_folder(root, classes=3, train_per_class=4, val_per_class=1, size=36)
    c0 = os.path.join(root, "train", "class_0")
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(c0, "whole.jpg"), quality=95)
    jpeg = open(os.path.join(c0, "whole.jpg"), "rb").read()
    open(os.path.join(c0, "truncated.jpg"), "wb").write(jpeg[: len(jpeg) // 2])
    open(os.path.join(c0, "empty.jpg"), "wb").close()
    open(os.path.join(c0, "notes.jpg"), "w").write("these are not the pixels you are looking for\n")
    Image.fromarray(pixels).convert("CMYK").save(os.path.join(c0, "cmyk.jpg"))
    Image.fromarray(pixels[..., 0]).save(os.path.join(c0, "gray.png"))
    Image.fromarray(np.dstack([pixels, pixels[..., :1]])).save(os.path.join(c0, "rgba.png"))
    Image.fromarray(pixels).save(os.path.join(c0, "UPPER.JPEG"))
    Image.fromarray(pixels).save(os.path.join(c0, "png_inside.JPEG"), format="PNG")  # as in real ImageNet
    for name in HIDDEN_FILES:  # garbage: if any of them were opened, it would be counted as unreadable
        open(os.path.join(c0, name), "wb").write(b"\x00garbage" * 10)
    os.makedirs(os.path.join(root, "train", ".ipynb_checkpoints"))  # hidden folders are not classes
    os.makedirs(os.path.join(root, "train", "__MACOSX"))
    return root


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    return write_bad_data(tmp_path_factory.mktemp("bad") / "data")


def test_dataset_skips_hidden_files_and_folders(bad_data):
    ds = data_lib.ImageFolderDataset(os.path.join(bad_data, "train"), transform=lambda x: x)
    names = {os.path.basename(p) for p, _ in ds.samples}
    assert not names & set(HIDDEN_FILES)
    assert {"UPPER.JPEG", "png_inside.JPEG", "cmyk.jpg", "gray.png", "rgba.png", *BAD_FILES} <= names
    assert ds.classes == ["class_0", "class_1", "class_2"]
    assert {t for _, t in ds.samples} == {0, 1, 2}
    bad = [ds[i] for i in range(len(ds)) if isinstance(ds[i], data_lib.BadSample)]
    assert sorted(os.path.basename(b.path) for b in bad) == sorted(BAD_FILES)


@pytest.mark.parametrize("name, mode", [("cmyk.jpg", "CMYK"), ("gray.png", "L"), ("rgba.png", "RGBA"),
                                        ("png_inside.JPEG", "RGB")])
def test_load_rgb_converts_to_rgb(bad_data, name, mode):
    path = os.path.join(bad_data, "train", "class_0", name)
    with Image.open(path) as raw:
        assert raw.mode == mode
    img = data_lib.load_rgb(path)
    assert img.mode == "RGB" and img.size == (48, 48)


def test_load_rgb_rgba_is_composited_on_white(tmp_path):
    path = str(tmp_path / "t.png")
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(path)  # fully transparent red
    assert data_lib.load_rgb(path).getpixel((0, 0)) == (255, 255, 255)


def test_training_skips_and_reports_unreadable_images(bad_data, tmp_path):
    proc = train(bad_data, tmp_path, "--epochs", "1")
    assert_ok(proc)
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("WARNING")]
    assert len(warnings) == 3, proc.stderr
    assert not [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith("WARNING")], proc.stderr
    for name in BAD_FILES:
        assert sum(os.path.join("class_0", name) in w for w in warnings) == 1, (name, proc.stderr)
    for name in HIDDEN_FILES:
        assert name not in proc.stderr + proc.stdout
    assert re.search(r"^Train \[0\] done .* images 18\s+unreadable images 3$", proc.stdout, re.M), proc.stdout
    assert "3 classes" in proc.stdout and "Traceback" not in proc.stderr
    assert load(tmp_path / "checkpoint.pth")["classes"] == ["class_0", "class_1", "class_2"]


def test_max_bad_images_stops_with_one_line_error(bad_data, tmp_path):
    proc = train(bad_data, tmp_path, "--epochs", "1", "--max-bad-images", "1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if not l.startswith("WARNING: skipped unreadable image")]
    assert len(errors) == 1 and errors[0].startswith("error: more than --max-bad-images 1"), proc.stderr
    assert 2 <= len(lines) - 1 <= 3  # the files that went over the limit are each named once
    # The steps trained before are kept (the data set can be fixed and the run resumed), as for any stop.
    assert "checkpoint saved to" in errors[0] and "resume with --resume auto" in errors[0], errors[0]
    position = load(tmp_path / "checkpoint.pth")["position"]
    assert position["epoch"] == 0 and position["step"] >= 1


# ----------------------------------------------------------------------------
# 5. Hostile checkpoint: unpickling it would run code
# ----------------------------------------------------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_evil(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    model = {"classifier.weight": torch.zeros(3, 1024), "classifier.bias": torch.zeros(3)}
    torch.save({"model": model, "epoch": 0, "payload": _Evil(str(marker))}, evil)
    assert not marker.exists()
    return evil, marker


def test_hostile_checkpoint_is_refused_in_process(tmp_path):
    evil, marker = write_evil(tmp_path)
    for load_fn in (weights.load_safe, weights.read_weights, weights.build_model_from_weights):
        with pytest.raises(cli.UserError, match="refused to load"):
            load_fn(str(evil))
    shutil.copy(evil, tmp_path / "checkpoint.pth")
    assert checkpoint.find_latest_checkpoint(str(tmp_path)) == (None, None)
    assert not marker.exists()


@pytest.mark.parametrize("how", ["resume", "pretrained", "test-only-env-override"])
def test_hostile_checkpoint_never_runs(data48, tmp_path, how):
    evil, marker = write_evil(tmp_path)
    out = tmp_path / "out"
    if how == "resume":
        proc = train(data48, out, "--epochs", "1", "--resume", str(evil))
    elif how == "pretrained":
        proc = train(data48, out, "--epochs", "1", "--pretrained", "--pretrained_weight_path", str(evil))
    else:  # --test-only --resume with torch's opt-out variable set: an explicit weights_only=True still wins
        proc = train(data48, out, "--test-only", "--resume", str(evil),
                     env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert_one_line_error(proc, "refused to load")
    assert str(evil) in proc.stderr
    assert not marker.exists()


# ----------------------------------------------------------------------------
# 6. Non-finite loss
# ----------------------------------------------------------------------------

def test_non_finite_loss_stops_without_touching_good_checkpoints(data48, tmp_path):
    # --lr-step-size 1 --lr-gamma 1e30: epoch 0 trains at lr 0.01, epoch 1 at 1e28, which really blows up.
    blowup = ["--lr-step-size", "1", "--lr-gamma", "1e30"]
    first = train(data48, tmp_path, "--epochs", "1", *blowup)
    assert_ok(first)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path) if n.endswith(".pth")}
    assert set(before) == {"checkpoint.pth", "model_best.pth"}  # by default no model_<epoch>.pth
    mtimes = {n: os.stat(tmp_path / n).st_mtime_ns for n in before}

    proc = train(data48, tmp_path, "--epochs", "3", "--resume", "auto", *blowup)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert_one_line_error(proc)
    m = re.search(r"non-finite loss at epoch (\d+) step (\d+)", proc.stderr)
    assert m and m.group(1) == "1", proc.stderr
    bad_step = int(m.group(2))
    # The log's step lines count from 1; the error names the first bad step on the same scale, and
    # every step before it was logged with a finite loss.
    logged = step_numbers(proc.stdout, 1)
    assert logged == list(range(1, bad_step)), (bad_step, proc.stdout)
    assert all(np.isfinite(float(x)) for x in re.findall(r"^Epoch: \[1\].* loss: (\S+)", proc.stdout, re.M))
    after = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path) if n.endswith(".pth")}
    assert after == before  # byte for byte: nothing was saved over the last good epoch
    assert {n: os.stat(tmp_path / n).st_mtime_ns for n in before} == mtimes
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_non_finite_loss_check_names_epoch_and_step():
    import engine
    from cli import NumericalError
    with pytest.raises(NumericalError, match=r"epoch 4 step 8\b"):
        engine.check_finite(torch.tensor(7), 4)  # the 8th step of the epoch (log line [8/N])
    engine.check_finite(torch.tensor(-1), 4)  # no bad step: nothing raised


# ----------------------------------------------------------------------------
# 7. A checkpoint that does not fit the model
# ----------------------------------------------------------------------------

def test_resume_with_other_num_classes_names_key_and_shapes(data48, reference, tmp_path):
    proc = train(data48, tmp_path, "--epochs", "3", "--num_classes", "5",
                 "--resume", str(reference / "checkpoint.pth"))
    assert_one_line_error(proc, "classifier.weight")
    line = proc.stderr.strip()
    assert "(3, 1024)" in line and "(5, 1024)" in line, line
    assert not (tmp_path / "checkpoint.pth").exists()


def test_describe_mismatch_in_process():
    import densenet
    small = lambda n: densenet.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=n)
    sd = small(3).state_dict()
    msg = weights.describe_mismatch(small(5), sd)
    f = small(5).classifier.in_features
    assert f"classifier.weight: (3, {f}) vs model (5, {f})" in msg and "classifier.bias: (3,) vs model (5,)" in msg
    assert "\n" not in msg
    assert weights.describe_mismatch(small(3), sd) is None


# ----------------------------------------------------------------------------
# 8. Bad arguments: one line on stderr, no traceback
# ----------------------------------------------------------------------------

BAD_ARGUMENTS = {
    "epochs": (["--epochs", "-1"], "--epochs"),
    "batch": (["--batch-size", "0"], "--batch-size"),
    "test-only": (["--test-only"], "--test-only"),
    "resume-missing": (["--resume", "/nonexistent/ckpt.pth"], "/nonexistent/ckpt.pth"),
    "outdir-under-file": (["--output-dir", "{file}/sub"], "--output-dir"),
    "outdir-is-file": (["--output-dir", "{file}"], "--output-dir"),
    "workers": (["--workers", "-1"], "--workers"),
    "max-bad-images": (["--max-bad-images", "-1"], "--max-bad-images"),
    "keep-checkpoints": (["--keep-checkpoints", "0"], "--keep-checkpoints"),
}


def bad_argv(data, tmp_path, case):
    regular = tmp_path / "a_file"
    regular.write_text("x")
    extra, fragment = BAD_ARGUMENTS[case]
    extra = [e.replace("{file}", str(regular)) for e in extra]
    return ["--data-path", data, "--output-dir", str(tmp_path / "out"), *BASE, "--epochs", "1", *extra], fragment


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_argument_is_one_line_error_in_process(data48, tmp_path, capfd, case):
    """main.run() is what `python main.py` exits with: here without paying a process start per case."""
    import main
    argv, fragment = bad_argv(data48, tmp_path, case)
    code = main.run(argv)
    out, err = capfd.readouterr()
    assert code == cli.EXIT_USER_ERROR
    proc = subprocess.CompletedProcess(argv, code, out, err)
    assert_one_line_error(proc, fragment)
    assert "Start training" not in out


@pytest.mark.parametrize("case", ["epochs", "outdir-under-file"])
def test_bad_argument_is_one_line_error(data48, tmp_path, case):
    argv, fragment = bad_argv(data48, tmp_path, case)
    proc = run_main(argv, env=ENV)
    assert_one_line_error(proc, fragment)
    assert proc.returncode == 2


# ----------------------------------------------------------------------------
# 9. --keep-checkpoints and --resume auto
# ----------------------------------------------------------------------------

def test_keep_checkpoints_and_resume_auto_skips_corrupt_newer_files(data48, tmp_path):
    proc = train(data48, tmp_path, "--epochs", "3", "--max-steps", "2", "--keep-checkpoints", "2")
    assert_ok(proc)
    names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".pth"))
    assert names == ["checkpoint.pth", "model_1.pth", "model_2.pth", "model_best.pth"], names
    assert load(tmp_path / "model_2.pth")["position"]["epoch"] == 3

    # Newer than model_2.pth but broken: a checkpoint cut off mid-copy and an empty file. (A new file:
    # checkpoint.pth and model_2.pth are one file with two names, hard links, until the next save.)
    good = (tmp_path / "checkpoint.pth").read_bytes()
    os.remove(tmp_path / "checkpoint.pth")
    (tmp_path / "checkpoint.pth").write_bytes(good[: len(good) // 2])
    (tmp_path / "model_3.pth").write_bytes(b"")
    now = time.time()
    for i, n in enumerate(["model_1.pth", "model_2.pth", "checkpoint.pth", "model_3.pth"]):
        os.utime(tmp_path / n, (now + i, now + i))
    assert checkpoint.find_latest_checkpoint(str(tmp_path))[0] == str(tmp_path / "model_2.pth")

    resumed = train(data48, tmp_path, "--epochs", "4", "--max-steps", "2", "--keep-checkpoints", "2",
                    "--resume", "auto")
    assert_ok(resumed)
    assert f"Resumed from {tmp_path / 'model_2.pth'}: weights after epoch 2; continuing at epoch 3, step 0" in \
        resumed.stdout, resumed.stdout
    assert step_numbers(resumed.stdout, 2) == [] and re.search(r"^Train \[3\] done", resumed.stdout, re.M)
    for skipped in ("checkpoint.pth", "model_3.pth"):
        assert skipped in resumed.stderr, resumed.stderr  # the user is told which newer files were unusable
    assert load(tmp_path / "checkpoint.pth")["position"]["epoch"] == 4
    assert load(tmp_path / "model_3.pth")["position"]["epoch"] == 4  # the empty file was replaced by a real one
    names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".pth"))
    assert names == ["checkpoint.pth", "model_2.pth", "model_3.pth", "model_best.pth"], names
