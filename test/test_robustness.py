"""Issue 15 "Never lose a run": every item that failed before, checked with real files, real signals and a
real full file system.

End-to-end cases run `python main.py` (densenet121 at 32 px, a 25-image set, batch 8) or the launchers as a
user would. The long runs several tests look at start in the background when the module starts (two chains,
see `background`), while the tests in the first half of the file run in the foreground; the second half reads
their results. Checks that stop in validate_args call main.run() in-process (what `python main.py` exits
with) to save a process start each; one of them also runs as a real process.
"""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
from PIL import Image

from conftest import (REPO, SMALL_RUN, assert_ok, assert_one_line_error, free_port, run_main, run_script,
                      write_image_folder)

# One OpenMP thread per run: on a small busy machine, OpenMP threads spin-waiting on a shared core made each
# training step ~20x slower.
ENV = {"OMP_NUM_THREADS": "1"}
TRAIN = ["--model", "densenet121", *SMALL_RUN, "-b", "8"]
WAIT = 1200  # seconds a test waits for a background run


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------

def main_args(data, out, *extra):
    return [*TRAIN, "--data-path", str(data), "--output-dir", str(out), *map(str, extra)]


def train(data, out, *extra, env=None, timeout=600):
    return run_main(main_args(data, out, *extra), env={**ENV, **(env or {})}, timeout=timeout)


def metrics_epochs(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line)["epoch"] for line in f if line.strip()]


def file_hashes(folder):
    """{relative path: sha256} of every file under `folder`."""
    hashes = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                hashes[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def load_checkpoint(path):
    import weights
    return weights.load_safe(str(path))


class LiveRun:
    """A process in the background whose stdout is read line by line while it runs (timestamped)."""

    def __init__(self, args, env=None, script=None, inherit_env=True, prefix=()):
        full_env = dict(os.environ) if inherit_env else {}
        full_env.update({**ENV, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.cmd = [*prefix, sys.executable, script or os.path.join(REPO, "main.py"), *map(str, args)]
        self.start = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.out, self.err = [], []
        self.readers = [threading.Thread(target=self._read, args=(stream, sink), daemon=True)
                        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.readers:
            t.start()

    def _read(self, stream, sink):
        for line in stream:
            sink.append((time.monotonic() - self.start, line))

    def wait_for(self, pattern, timeout=300):
        """(seconds since start, line) of the first stdout line matching `pattern`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in list(self.out):
                if re.search(pattern, line):
                    return t, line
            if self.proc.poll() is not None and not any(r.is_alive() for r in self.readers):
                break
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"no line matching {pattern!r} (exit {self.proc.poll()})\n--- stdout\n"
                    + "".join(l for _, l in self.out) + "--- stderr\n" + "".join(l for _, l in self.err))

    def finish(self, timeout=600):
        try:
            self.proc.wait(timeout)
        finally:
            self.kill()
        for t in self.readers:
            t.join(10)
        return subprocess.CompletedProcess(self.cmd, self.proc.returncode, "".join(l for _, l in self.out),
                                           "".join(l for _, l in self.err))

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_in_process(argv, capfd):
    """main.run(argv) in this process: (exit code, CompletedProcess, seconds)."""
    import main
    capfd.readouterr()
    start = time.monotonic()
    code = main.run([str(a) for a in argv])
    seconds = time.monotonic() - start
    out, err = capfd.readouterr()
    return code, subprocess.CompletedProcess(argv, code, out, err), seconds


# ----------------------------------------------------------------------------
# The long runs, in the background
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data25(tmp_path_factory):
    # 5 classes x 5 = 25 training images: with -b 8 the last batch of each epoch holds a single image.
    return write_image_folder(tmp_path_factory.mktemp("robust") / "data", classes=5, train_per_class=5,
                              val_per_class=1, size=40)


def run_trained(data, base):
    """Two full epochs (4 steps each, the last a batch of 1): items 1, 7 and 18 look at this run."""
    out = base / "trained"
    proc = train(data, out, "--epochs", 2)
    return {"dir": str(out), "proc": proc, "hashes": file_hashes(out) if proc.returncode == 0 else {}}


def run_after_trained(data, base, trained, name, *extra):
    """A copy of the trained run's folder, then main.py on it with `extra`."""
    out = base / name
    if trained["proc"].returncode == 0:
        shutil.copytree(trained["dir"], out)
    with open(out / "metrics.jsonl") as f:
        before = f.read()
    return {"dir": out, "metrics_before": before, "proc": train(data, out, *extra)}


def run_help_and_bad_value(data, base):
    """`--lr nan` and `--help` side by side: the same imports under the same load, one stops at validation."""
    started = {}
    procs = {}
    for name, argv in (("lr-nan", main_args(data, base / "lr-nan", "--lr", "nan")), ("help", ["--help"])):
        started[name] = time.monotonic()
        procs[name] = subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"), *argv], cwd=REPO,
                                       env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=600)
        results[name] = (subprocess.CompletedProcess(p.args, p.returncode, out, err), time.monotonic() - started[name])
    return results


KILL_AFTER_SAVE_WRAPPER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import checkpoint
import main
_save = checkpoint.save_checkpoints
def save_checkpoints(state, output_dir, epoch=None, **kwargs):
    _save(state, output_dir, epoch=epoch, **kwargs)
    if epoch == 1:  # epoch 1's checkpoint.pth is renamed into place: die before anything else happens
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_checkpoints = save_checkpoints
sys.exit(main.run(sys.argv[1:]))
"""


def run_killed_then_resumed(data, base):
    """SIGKILL right after epoch 1's checkpoint is saved (the moment the issue names), then --resume auto."""
    out = base / "killed"
    wrapper = base / "kill_after_save.py"
    wrapper.write_text(KILL_AFTER_SAVE_WRAPPER.format(repo=REPO))
    live = LiveRun(main_args(data, out, "--epochs", 3, "--max-steps", 1), script=str(wrapper))
    killed = live.finish()
    after_kill = {"epochs": metrics_epochs(out) if (out / "metrics.jsonl").exists() else None,
                  "lock": (out / ".lock").read_text() if (out / ".lock").exists() else None}
    resumed = train(data, out, "--epochs", 3, "--max-steps", 1, "--resume", "auto")
    return {"dir": out, "killed": killed, "killed_pid": live.pid, "after_kill": after_kill, "resumed": resumed}


# Root reads any folder whatever its mode: a process that should find a chmod-000 folder unreadable must run
# without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH. This prefix drops both from the bounding set (prctl
# PR_CAPBSET_DROP, options 24 and caps 1, 2) and then execs the real command, which starts without them.
DROP_DAC_PREFIX = [sys.executable, "-c", "import ctypes, os, sys\n"
                   "libc = ctypes.CDLL(None, use_errno=True)\n"
                   "for cap in (1, 2):\n"
                   "    if libc.prctl(24, cap, 0, 0, 0):\n"
                   "        sys.exit('cannot drop capability %d: %s' % (cap, os.strerror(ctypes.get_errno())))\n"
                   "os.execv(sys.argv[1], sys.argv[1:])\n"]


def can_lock_out(folder):
    """Whether a process started under DROP_DAC_PREFIX really cannot list a chmod-000 folder."""
    r = subprocess.run([*DROP_DAC_PREFIX, sys.executable, "-c", f"import os; os.listdir({str(folder)!r})"],
                       capture_output=True, text=True, timeout=120)
    return "PermissionError" in r.stderr


def run_empty_classes(base):
    """A train/ with an empty class folder, one holding only a .txt file, and (where possible) an unreadable one."""
    data = write_image_folder(base / "classes_data", classes=2, train_per_class=2, val_per_class=1, size=40)
    for name in ("class_empty", "class_locked", "class_txt"):
        shutil.copytree(os.path.join(data, "val", "class_0"), os.path.join(data, "val", name))
    os.makedirs(os.path.join(data, "train", "class_empty"))
    os.makedirs(os.path.join(data, "train", "class_txt"))
    with open(os.path.join(data, "train", "class_txt", "notes.txt"), "w") as f:
        f.write("labels to come\n")
    locked = os.path.join(data, "train", "class_locked")
    shutil.copytree(os.path.join(data, "train", "class_0"), locked)
    os.chmod(locked, 0)
    try:
        lockable = os.geteuid() != 0 or can_lock_out(locked)
        prefix = DROP_DAC_PREFIX if lockable and os.geteuid() == 0 else []
        proc = subprocess.run([*prefix, sys.executable, os.path.join(REPO, "main.py"),
                               *main_args(data, base / "classes_out", "--epochs", 0)], cwd=REPO,
                              env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)
    finally:
        os.chmod(locked, 0o755)
    return {"proc": proc, "lockable": lockable}


@pytest.fixture(scope="module", autouse=True)
def background(data25, tmp_path_factory):
    """{name: Future} of the long runs, started when the module starts, in two chains of one process at a time."""
    base = tmp_path_factory.mktemp("background")
    futures = {name: Future() for name in ("trained", "overwrite", "resume", "test_only", "help_and_bad_value",
                                           "killed", "empty_classes")}

    def chain(*steps):
        for name, job in steps:
            try:
                futures[name].set_result(job())
            except BaseException as e:  # the test that reads it fails; the chain goes on
                futures[name].set_exception(e)

    trained = lambda: futures["trained"].result()  # noqa: E731  (each follow-up runs after it, in its chain)
    chains = [
        [("trained", lambda: run_trained(data25, base)),
         ("overwrite", lambda: run_after_trained(data25, base, trained(), "overwrite", "--epochs", 1,
                                                 "--max-steps", 1, "--overwrite")),
         ("resume", lambda: run_after_trained(data25, base, trained(), "resume", "--epochs", 3, "--max-steps", 1,
                                              "--resume", "auto")),
         ("test_only", lambda: train(data25, base / "eval", "--test-only", "--resume",
                                     os.path.join(trained()["dir"], "checkpoint.pth")))],
        [("help_and_bad_value", lambda: run_help_and_bad_value(data25, base)),
         ("killed", lambda: run_killed_then_resumed(data25, base)),
         ("empty_classes", lambda: run_empty_classes(base))],
    ]
    threads = [threading.Thread(target=chain, args=steps, daemon=True) for steps in chains]
    for t in threads:
        t.start()
    yield futures
    for t in threads:
        t.join(WAIT)


def result(background, name):
    return background[name].result(timeout=WAIT)


# ============================================================================
# Foreground tests (they run while the background runs are under way)
# ============================================================================

# Items 3-5: errors found before any work starts ------------------------------

@pytest.mark.parametrize("case", ["under-a-file", "a-directory"])
def test_log_file_that_cannot_be_opened_is_one_line(data25, tmp_path, capfd, case):
    # Item 3: the old code printed a NotADirectoryError / IsADirectoryError traceback for a bad --log-file.
    regular = tmp_path / "a_file"
    regular.write_text("not a folder\n")
    log_file = regular / "train.log" if case == "under-a-file" else tmp_path
    code, proc, _ = run_in_process(main_args(data25, tmp_path / "out", "--log-file", log_file), capfd)
    assert code == 2
    assert_one_line_error(proc, f"--log-file {log_file}")
    assert "Start training" not in proc.stdout


def test_num_classes_below_class_folders_is_one_line(data25, tmp_path, capfd):
    # Item 4: the old code trained, then failed deep in the loss with "Target 4 is out of bounds".
    code, proc, _ = run_in_process(main_args(data25, tmp_path / "out", "--num_classes", 3), capfd)
    assert code == 2
    assert_one_line_error(proc, "--num_classes 3")
    assert "5 class folders" in proc.stderr and "Start training" not in proc.stdout


BAD_VALUES = {
    "momentum": (["--momentum", "-1"], "--momentum"),
    "drop-rate": (["--drop-rate", "1.5"], "--drop-rate"),
    "label-smoothing": (["--label-smoothing", "1.5"], "--label-smoothing"),
    "model-ema-steps": (["--model-ema-steps", "0"], "--model-ema-steps"),
    "ra-reps": (["--ra-reps", "0"], "--ra-reps"),
    "lr": (["--lr", "nan"], "--lr"),
    "wd": (["--wd", "-1"], "--wd"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_out_of_range_value_fails_before_data_is_read(data25, tmp_path, capfd, case):
    # Item 5: the old code accepted these and failed (or silently diverged) after loading data and the model.
    extra, fragment = BAD_VALUES[case]
    code, proc, seconds = run_in_process(main_args(data25, tmp_path / "out", *extra), capfd)
    assert code == 2
    assert_one_line_error(proc, fragment)
    assert seconds < 30 and "Start training" not in proc.stdout and "Data:" not in proc.stdout, proc.stdout


# Item 10: 16-bit PNGs --------------------------------------------------------

def test_sixteen_bit_png_is_scaled_not_saturated(tmp_path, torch_one_thread):
    # Item 10: the old code's convert("RGB") clipped every 16-bit value above 255: an all-white image.
    import data as data_lib
    import decode

    values = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    folder = tmp_path / "train" / "class_0"
    folder.mkdir(parents=True)
    path = folder / "gradient16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode in decode.SIXTEEN_BIT_MODES, raw.mode
    rgb = np.asarray(decode.load_rgb(str(path)))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    expected = np.round(values / 257).astype(np.uint8)  # v / 257 is never exactly k + 0.5: no rounding ties
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], expected)
    assert rgb.min() == 0 and rgb.max() == 255

    def spans_the_range(image):
        pixels = np.asarray(image)
        assert pixels.min() <= 40 and pixels.max() >= 215, (pixels.min(), pixels.max())
        assert (pixels == 255).mean() < 0.1 and 90 < pixels.mean() < 165, pixels.mean()

    train_set = data_lib.train_dataset(str(tmp_path / "train"), 32, scale=(0.9, 1.0), hflip_prob=0,
                                       fast_decode=True)
    image, target = train_set[0]
    assert tuple(image.shape) == (3, 32, 32) and target == 0
    spans_the_range(image)
    eval_set = data_lib.ImageFolderDataset(str(tmp_path / "train"), data_lib.eval_transform(32, 32))
    image, _ = eval_set[0]
    spans_the_range(image)


# Item 14: the demo keeps one checkpoint --------------------------------------

def test_demo_keeps_only_the_newest_checkpoint():
    # Item 14: the old demo kept every epoch's DenseNet-201 checkpoint (~146 MB each, 1.6 GB in all). It now
    # keeps what every run keeps by default: checkpoint.pth and model_best.pth, no model_<epoch>.pth.
    with open(os.path.join(REPO, "test", "demo.sh")) as f:
        script = f.read().replace("\\\n", " ")
    launch = [l for l in script.splitlines() if "train_full_1p.sh" in l and l.lstrip().startswith("exec ")]
    assert len(launch) == 1, script
    assert "--keep-checkpoints" not in launch[0], launch[0]
    import main
    assert main.get_args_parser().parse_args(["--synthetic"]).keep_checkpoints is None  # no model_<epoch>.pth


# Item 16: plot_metrics.py ----------------------------------------------------

def test_plot_uses_log_loss_axis_and_names_the_run(tmp_path, monkeypatch):
    # Item 16: the old plot drew loss on a linear axis (epoch 0's val loss of 63 flattened the rest) and
    # titled every launcher run "0".
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.axes
    import matplotlib.figure

    import plot_metrics

    scales, titles = [], []
    set_yscale, suptitle = matplotlib.axes.Axes.set_yscale, matplotlib.figure.Figure.suptitle

    def spy_yscale(ax, value, **kwargs):
        scales.append((ax.get_ylabel(), value))
        return set_yscale(ax, value, **kwargs)

    def spy_title(fig, text, **kwargs):
        titles.append(text)
        return suptitle(fig, text, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_yscale", spy_yscale)
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", spy_title)

    def write_run(folder, val_losses, run_json=None):
        folder.mkdir(parents=True)
        with open(folder / "metrics.jsonl", "w") as f:
            for epoch, val_loss in enumerate(val_losses):
                f.write(json.dumps({"epoch": epoch, "lr": 0.1, "train_loss": 1.5, "val_loss": val_loss,
                                    "train_acc1": 40.0, "val_acc1": 50.0, "val_acc5": 90.0}) + "\n")
        if run_json:
            (folder / "run.json").write_text(json.dumps(run_json))
        return str(folder / "metrics.jsonl")

    named = write_run(tmp_path / "named", [63.0, 0.9, 0.5], {"network": "DenseNet121_for_PyTorch",
                                                               "batch_size": 8, "world_size": 1})
    assert plot_metrics.run([named, "-o", str(tmp_path / "a.png")]) == 0
    assert ("loss", "log") in scales, scales
    assert not [s for s in scales if s[0] == "learning rate"]  # a constant lr stays linear
    assert titles[-1].startswith("DenseNet121_for_PyTorch_bs8_1p: 3 epochs"), titles
    assert os.path.getsize(tmp_path / "a.png") > 0

    scales.clear()
    rank_folder = write_run(tmp_path / "output" / "0", [2.0, 1.5, 1.2])  # a launcher's rank folder, no run.json
    assert plot_metrics.run([rank_folder, "-o", str(tmp_path / "b.png")]) == 0
    assert not scales  # within a decade: linear
    assert titles[-1].startswith("output/0: 3 epochs"), titles


# Item 1 (unreadable image): ---------------------------------------------------

def test_unreadable_image_leaving_one_in_a_batch_of_two_is_skipped(tmp_path):
    # Item 1: the old code crashed when a truncated JPEG left a single readable image in a batch of 2.
    data = write_image_folder(tmp_path / "data", classes=2, train_per_class=2, val_per_class=1, size=40)
    victim = os.path.join(data, "train", "class_0", "img_0.JPEG")
    with open(victim, "rb") as f:
        jpeg = f.read()
    with open(victim, "wb") as f:
        f.write(jpeg[: len(jpeg) // 2])  # 4 images, one truncated: one of the two batches of 2 holds it
    proc = train(data, tmp_path / "out", "--epochs", 1, "-b", 2)
    assert_ok(proc)
    assert "skipped unreadable image" in proc.stderr and "img_0.JPEG" in proc.stderr, proc.stderr
    assert "skipped a batch of 1 readable image (training needs 2)" in proc.stderr, proc.stderr
    assert re.search(r"^Train \[0\] done .* images 2\s+unreadable images 1$", proc.stdout, re.M), proc.stdout


# Item 2: a full disk during a checkpoint save --------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 100 MB file system: epoch 0's first checkpoint.pth (densenet121, 56 MB, saved before its
    evaluation) fits; its second save after the evaluation (56 MB more while the first stays until the
    rename) does not."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(mount_point)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip() or r.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True)


def test_full_disk_during_checkpoint_is_one_line_and_keeps_previous(data25, small_disk):
    # Item 2: the old code died with a RuntimeError traceback from torch.save's zip writer when the disk filled.
    out = small_disk / "run"
    proc = train(data25, out, "--epochs", 2, "--max-steps", 1)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert_one_line_error(proc, "checkpoint")
    assert "No space left on device" in proc.stderr, proc.stderr
    assert "Train [0] done" in proc.stdout and " * Acc@1" in proc.stdout  # the save after evaluation failed
    state = load_checkpoint(out / "checkpoint.pth")  # the previous checkpoint is intact and loads
    assert state["epoch"] == 0 and state["position"]["epoch"] == 1
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]  # the half-written temporary file is gone


# Item 6: one run per output folder --------------------------------------------

def test_second_run_into_a_busy_output_dir_is_refused(data25, tmp_path):
    # Item 6: the old code let two runs write the same checkpoint.pth and metrics.jsonl at once.
    out = tmp_path / "run"
    first = LiveRun(main_args(data25, out, "--epochs", 1, "--max-steps", 2))
    first.wait_for(r"^Epoch: \[0\]")
    # Hold the first run where it is (SIGSTOP; it keeps its lock) so the second certainly starts while it runs.
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = train(data25, out, "--epochs", 1, "--max-steps", 2, "--resume", "auto")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2
    assert_one_line_error(second, "in use")
    assert f"pid {first.pid}" in second.stderr, second.stderr
    assert_ok(first.finish())
    assert metrics_epochs(out) == [0]  # the first run's curve, untouched by the second
    assert load_checkpoint(out / "checkpoint.pth")["position"]["epoch"] == 1


# Items 8 and 17: the launchers keep the previous run; a wrong --data_path fails before Python starts ----------

def test_launcher_keeps_the_previous_run_and_fails_fast(data25, tmp_path):
    # Item 8: the old launcher `rm -rf`'d output/0 before starting, so a typo in a rerun destroyed the last run.
    root = tmp_path / "output"
    env = {**ENV, "OUTPUT_ROOT": str(root)}
    first = run_script("train_full_1p.sh", [f"--data_path={data25}", "--epochs=1", *TRAIN, "--max-steps", "1"],
                       env=env, timeout=600)
    assert_ok(first)
    run0 = root / "0"
    summaries = [n for n in os.listdir(run0) if n.endswith(".log") and n != "train_0.log"]
    assert (run0 / "train_0.log").is_file() and len(summaries) == 1, os.listdir(run0)
    before = file_hashes(run0)

    # Item 17: the old launcher started Python (seconds of imports) before finding --data_path missing.
    marker = tmp_path / "python_started"
    fake_python = tmp_path / "fake_python"
    fake_python.write_text(f"#!/bin/sh\ntouch {marker}\nexit 0\n")
    fake_python.chmod(0o755)
    start = time.monotonic()
    bad = run_script("train_full_1p.sh", ["--data_path=/nonexistent", "--epochs=1"],
                     env={**env, "PYTHON": str(fake_python)}, timeout=60)
    seconds = time.monotonic() - start
    assert bad.returncode == 2
    assert_one_line_error(bad, "/nonexistent")
    assert seconds < 2, seconds
    assert not marker.exists()  # Python never started
    assert os.listdir(root) == ["0"] and file_hashes(run0) == before  # nothing moved

    # A typo in the rerun is refused before anything is moved (test_launchers.py: the move itself, and the
    # previous run put back when main.py refuses what the launcher cannot check).
    second = run_script("train_full_1p.sh", [f"--data_path={data25}", "--epochs=abc", *TRAIN], env=env,
                        timeout=300)
    assert second.returncode == 2
    assert_one_line_error(second, "--epochs=abc: expected a whole number of epochs")
    assert os.listdir(root) == ["0"] and file_hashes(run0) == before  # intact: log, summary, checkpoints, metrics


# Item 13: half a torchrun job ------------------------------------------------

def test_half_a_torchrun_job_says_what_it_waits_for_then_fails(data25, tmp_path):
    # Item 13: the old code sat silent for the whole --dist-timeout (30 min default), then printed a traceback.
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TORCHELASTIC_", "LOCAL_WORLD_SIZE", "GROUP_", "ROLE_", "RANK_"))}
    env.update({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port)})
    live = LiveRun(main_args(data25, tmp_path / "out", "--epochs", 1, "--dist-timeout", 10), env=env,
                   inherit_env=False)
    seen_at, line = live.wait_for(r"Joining the process group", timeout=300)
    assert f"rendezvous at 127.0.0.1:{port}" in line, line
    assert "waiting up to 10 s for all 2 processes" in line, line
    assert live.proc.poll() is None  # said while waiting, not afterwards
    proc = live.finish(timeout=300)
    ended_at = time.monotonic() - live.start
    assert ended_at - seen_at >= 8, (seen_at, ended_at)  # the line came ~10 s (the timeout) before the end
    assert proc.returncode == 2
    assert_one_line_error(proc, "could not join the process group")
    assert "Start training" not in proc.stdout


# ============================================================================
# Results of the background runs
# ============================================================================

# Item 1: batches of one image --------------------------------------------------

def test_batch_of_one_image_is_skipped_not_a_crash(background):
    # Item 1: the old code crashed in BatchNorm ("Expected more than 1 value per channel") on a last batch of 1.
    trained = result(background, "trained")
    proc = trained["proc"]
    assert_ok(proc)
    for epoch in (0, 1):
        assert f"WARNING: epoch {epoch} step 4: skipped a batch of 1 readable image (training needs 2)" in proc.stderr, proc.stderr
    assert metrics_epochs(trained["dir"]) == [0, 1]
    with open(os.path.join(trained["dir"], "metrics.jsonl")) as f:
        assert [json.loads(line)["images"] for line in f] == [24, 24]


# Item 5 as a real process -------------------------------------------------------

def test_out_of_range_value_fails_fast_as_a_process(background):
    # Item 5: the same as a real process: exit 2, one line, long before a training run could start.
    runs = result(background, "help_and_bad_value")
    proc, seconds = runs["lr-nan"]
    assert proc.returncode == 2
    assert_one_line_error(proc, "--lr must be a finite number")
    assert "Start training" not in proc.stdout and "Data:" not in proc.stdout, proc.stdout
    # Its cost is the imports: on a loaded machine those alone can take 30 s, so compare with `--help`, which
    # imports the same modules at the same time and does nothing else.
    help_seconds = runs["help"][1]
    assert seconds < help_seconds + 10, (seconds, help_seconds)


# Item 15: --help in groups, with defaults ------------------------------------

def help_entries(text):
    """{option string: its whole help entry, whitespace collapsed} from argparse's --help output."""
    entries, current = {}, None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            current = [line]
            for opt in re.findall(r"(?:^|[ ,])(--?[A-Za-z][\w-]*)", line.strip().split("  ")[0]):
                entries[opt] = current
        elif current is not None and line.startswith("    "):
            current.append(line)
        else:
            current = None
    return {opt: " ".join(" ".join(lines).split()) for opt, lines in entries.items()}


def test_help_is_grouped_and_shows_defaults(background):
    # Item 15: the old --help was one flat list of ~80 options without their defaults.
    import argparse

    import main

    proc, _ = result(background, "help_and_bad_value")["help"]
    assert_ok(proc)
    headings = re.findall(r"^(\S[^\n]*):$", proc.stdout, re.M)
    groups = ("data", "model", "optimisation", "recipe options", "mixed precision", "devices and distribution",
              "run control")
    positions = [next((i for i, h in enumerate(headings) if h.startswith(g)), None) for g in groups]
    assert None not in positions and positions == sorted(positions), headings
    entries = help_entries(proc.stdout)
    for option, default in {"--epochs": "90", "--lr": "0.1", "--train-crop-size": "224", "--seed": "1234",
                            "--print-freq": "10", "--warmup-steps": "5", "-b": "128", "--model": "densenet201"}.items():
        assert f"(default: {default})" in entries[option], (option, entries[option])
    for action in main.get_args_parser()._actions:  # every option with a default shows it
        if action.option_strings and action.default not in (None, argparse.SUPPRESS):
            assert "default" in entries[action.option_strings[0]], (action.option_strings, action.default)
    for entry in entries.values():  # a default explained in words is not followed by "(default: None)"
        assert entry.count("default") <= 1, entry


# Item 7: a fresh run never replaces another run's files -----------------------

@pytest.mark.parametrize("extra", [[], ["--epochs", "0"]], ids=["fresh", "epochs-0"])
def test_fresh_run_into_another_runs_folder_is_refused(data25, background, capfd, extra):
    # Item 7: the old code deleted metrics.jsonl (and then overwrote the checkpoints) of the run already there.
    trained = result(background, "trained")
    assert_ok(trained["proc"])
    code, proc, _ = run_in_process(main_args(data25, trained["dir"], *extra), capfd)
    assert code == 2
    assert_one_line_error(proc, "holds another run")
    assert "--overwrite" in proc.stderr and "--resume auto" in proc.stderr
    assert file_hashes(trained["dir"]) == trained["hashes"]  # nothing deleted, nothing rewritten


def test_overwrite_starts_a_fresh_run(background):
    # Item 7: --overwrite is the one way to replace a run; its curve starts afresh.
    run = result(background, "overwrite")
    assert_ok(run["proc"])
    assert "Start training: epochs 0..0" in run["proc"].stdout
    assert metrics_epochs(run["dir"]) == [0]


def test_resume_auto_continues_the_run_in_the_folder(background):
    # Item 7: --resume auto passes the fresh-folder check and continues where the run stopped.
    run = result(background, "resume")
    assert_ok(run["proc"])
    assert "weights after epoch 1; continuing at epoch 2, step 0" in run["proc"].stdout, run["proc"].stdout
    assert metrics_epochs(run["dir"]) == [0, 1, 2]
    with open(run["dir"] / "metrics.jsonl") as f:
        assert f.read().startswith(run["metrics_before"])


# Item 18: --test-only says whose weights it evaluates --------------------------

def test_test_only_names_the_epoch_of_the_weights(background):
    # Item 18: the old code said "epoch 2" (the next epoch to train) for weights saved after epoch 1.
    proc = result(background, "test_only")
    assert_ok(proc)
    ckpt = os.path.join(result(background, "trained")["dir"], "checkpoint.pth")
    assert f"Evaluating {ckpt}: weights after epoch 1" in proc.stdout, proc.stdout
    assert "Start training" not in proc.stdout and " * Acc@1" in proc.stdout


# Items 9 and 6 (stale lock): SIGKILL right after a checkpoint, then --resume auto -----------

def test_kill_after_checkpoint_leaves_no_metrics_gap(background):
    # Item 9: the old code appended the metrics row after the checkpoint, so a kill in between lost epoch 1's row.
    r = result(background, "killed")
    assert r["killed"].returncode == -signal.SIGKILL, r["killed"].stdout + r["killed"].stderr
    assert r["after_kill"]["epochs"] == [0, 1]
    assert_ok(r["resumed"])
    assert "continuing at epoch 2" in r["resumed"].stdout, r["resumed"].stdout
    epochs = metrics_epochs(r["dir"])
    assert sorted(set(epochs)) == [0, 1, 2], epochs  # duplicates allowed, no gap
    assert epochs == sorted(epochs)


def test_sigkilled_run_leaves_no_stale_lock(background):
    # Item 6: a lock file left by a SIGKILLed run must not block the folder (flock dies with its process).
    r = result(background, "killed")
    assert r["killed"].returncode == -signal.SIGKILL
    assert (r["after_kill"]["lock"] or "").startswith(f"pid {r['killed_pid']} "), r["after_kill"]  # left behind
    assert_ok(r["resumed"])
    assert "in use" not in r["resumed"].stderr


# Item 11: classes nothing can be learned from ----------------------------------

def warning_about_classes(proc):
    lines = [l for l in proc.stderr.splitlines() if "no usable training image" in l]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("WARNING: "), lines[0]
    return lines[0]


def test_classes_without_training_images_are_named_at_start(background):
    # Item 11: the old code trained without a word on classes that had no image (a folder empty or of .txt files).
    proc = result(background, "empty_classes")["proc"]
    assert_ok(proc)
    line = warning_about_classes(proc)
    assert "of 5 classes" in line
    assert "class_empty (no image files)" in line and "class_txt (no image files)" in line
    assert "class_0" not in line and "class_1" not in line


def test_unreadable_class_folder_is_named_at_start(background):
    # Item 11: the old code's os.walk skipped a folder it could not read without a word.
    run = result(background, "empty_classes")
    if not run["lockable"]:
        pytest.skip("cannot make a folder unreadable here: root bypasses permissions and dropping "
                    "CAP_DAC_OVERRIDE (prctl PR_CAPBSET_DROP) is not allowed in this container")
    line = warning_about_classes(run["proc"])
    assert "3 of 5 classes" in line
    assert "class_locked (unreadable folder: Permission denied)" in line
