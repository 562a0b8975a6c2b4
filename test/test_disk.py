"""What a run writes, where, and what happens when the disk misbehaves (issue 20: items 3, 4, 8, 13, 14, 20
(file modes) and 21 (messages about files)).

Real parts throughout: real image folders, real main.py / predict.py / export_onnx.py processes, real small
tmpfs file systems filled up or remounted read-only, a real deleted folder, real torchrun (gloo) jobs of 2 and
3 ranks, a real second process holding a run's lock. The one stand-in: a file system without hard links
(FAT, some network shares) cannot be mounted here, so that fallback is tested with os.link failing as it
fails there (EPERM).
"""
import contextlib
import errno
import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest
import torch

import checkpoint

import weights as weights_lib
import densenet
import launch as launch_lib
import main
import rundir
from cli import UserError
from conftest import (REPO, SMALL_RUN, assert_ok, assert_one_line_error, clean_env, free_port, run_main,
                      write_image_folder)

ENV = {"OMP_NUM_THREADS": "1"}
TRAIN = ["--model", "densenet121", *SMALL_RUN, "-b", "4", "--max-steps", "1"]
STAMP = r"\d{8}-\d{6}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("disk") / "data", classes=3, train_per_class=4,
                              val_per_class=2, size=32)


def train(data, *extra, cwd=REPO, env=None, timeout=600):
    return run_main([*TRAIN, "--data-path", str(data), *map(str, extra)], cwd=str(cwd),
                    env={**ENV, **(env or {})}, timeout=timeout)


@contextlib.contextmanager
def tmpfs(mount_point, size="1m"):
    """A real small file system of our own (we are root in CI and here)."""
    os.makedirs(mount_point, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip() or r.returncode}")
    try:
        yield str(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(folder):
    """Fill the file system holding `folder` to the last byte."""
    fd = os.open(os.path.join(folder, "filler"), os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    probe = os.open(os.path.join(folder, "probe"), os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError):
            os.write(probe, b"x")
    finally:
        os.close(probe)
        os.remove(os.path.join(folder, "probe"))


def remount(mount_point, mode, wait_s=60):
    """remount,ro|rw; a write in progress makes remount,ro busy for a moment: retry."""
    deadline = time.time() + wait_s
    while True:
        r = subprocess.run(["mount", "-o", f"remount,{mode}", str(mount_point)], capture_output=True, text=True)
        if r.returncode == 0:
            return
        assert time.time() < deadline, r.stderr
        time.sleep(0.05)


def wait_for(predicate, proc, timeout=600):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def tiny_state(value):
    """A checkpoint's layout (training_state's keys that matter here), small."""
    return {"model": {"w": torch.full((256,), float(value))}, "optimizer": {"state": {}, "param_groups": []},
            "epoch": value, "best_acc1": float(value), "classes": ["a", "b"], "args": {"model": "densenet121"}}


# ----------------------------------------------------------------------------
# Item 3: no --output-dir: a folder of its own, under output/train
# ----------------------------------------------------------------------------

def test_default_output_dir_is_a_new_folder_per_run_and_resume_auto_finds_it(data, tmp_path):
    # Old: the current folder took checkpoint.pth, model_0.pth, model_best.pth, metrics.jsonl, run.json, .lock,
    # and a second plain run there was refused ("holds another run").
    first = train(data, "--epochs", 1, cwd=tmp_path)
    assert_ok(first)
    assert sorted(os.listdir(tmp_path)) == ["output"], os.listdir(tmp_path)
    runs = sorted(os.listdir(tmp_path / "output" / "train"))
    assert len(runs) == 1 and re.fullmatch(rf"{STAMP}-densenet121", runs[0]), runs
    run0 = os.path.join("output", "train", runs[0])
    assert f"Output: {run0} (no --output-dir given: a new folder for this run)" in first.stdout.splitlines()
    assert first.stdout.index("Output: ") < first.stdout.index("Data: ")  # said at start-up
    assert "checkpoint.pth" in os.listdir(tmp_path / run0)
    # Item 20: checkpoints follow the umask as metrics.jsonl does (they were 0600 from mkstemp).
    mode = stat.S_IMODE(os.stat(tmp_path / run0 / "checkpoint.pth").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / run0 / "metrics.jsonl").st_mode), oct(mode)

    second = train(data, "--epochs", 0, cwd=tmp_path)  # a second plain run: neither refused nor in run0
    assert_ok(second)
    runs = sorted(os.listdir(tmp_path / "output" / "train"))
    assert len(runs) == 2 and all(re.fullmatch(rf"{STAMP}-densenet121(-\d+)?", r) for r in runs), runs
    run1 = os.path.join("output", "train", [r for r in runs if r != os.path.basename(run0)][0])
    assert f"Output: {run1} (no --output-dir given" in second.stdout
    assert "checkpoint.pth" not in os.listdir(tmp_path / run1)

    # --resume auto without --output-dir: the newest densenet121 run that holds a checkpoint (run0, not run1).
    again = train(data, "--epochs", 2, "--resume", "auto", cwd=tmp_path)
    assert_ok(again)
    assert f"Output: {run0} (--resume auto: the newest densenet121 run under output/train)" in again.stdout
    assert f"Resumed from {os.path.join(run0, 'checkpoint.pth')}" in again.stdout, again.stdout
    assert [json.loads(l)["epoch"] for l in open(tmp_path / run0 / "metrics.jsonl")] == [0, 1]
    assert len(os.listdir(tmp_path / "output" / "train")) == 2


def test_test_only_without_output_dir_creates_nothing(data, tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(densenet.build_model("densenet121", num_classes=3).state_dict(), weights)
    proc = train(data, "--test-only", "--resume", weights, cwd=tmp_path)
    assert_ok(proc)
    assert " * Acc@1" in proc.stdout and "Output: " not in proc.stdout
    assert sorted(os.listdir(tmp_path)) == ["w.pth"]  # old: run.json-less, but the folder check created "."


@pytest.mark.parametrize("ranks", [2, 3])
def test_default_output_dir_is_decided_and_created_by_rank_0_only(tmp_path, ranks):
    # Under torchrun only rank 0 picks the name and creates the folder; the other ranks create nothing (each
    # picking its own would make one folder per rank: <time>-densenet121, -1, -2).
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", os.path.join(REPO, "main.py"),
           "--synthetic", "--model", "densenet121", "--device", "cpu", "--epochs", "1", "--max-steps", "1",
           "--warmup-steps", "0", "-b", str(2 * ranks),
           "--num_classes", "3", "--train-crop-size", "32", "--workers", "0"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert_ok(proc)
    runs = os.listdir(tmp_path / "output" / "train")
    assert len(runs) == 1 and re.fullmatch(rf"{STAMP}-densenet121", runs[0]), runs
    assert proc.stdout.count("Output: output/train/") == 1, proc.stdout
    assert json.load(open(tmp_path / "output" / "train" / runs[0] / "run.json"))["world_size"] == ranks
    assert load(tmp_path / "output" / "train" / runs[0] / "checkpoint.pth")["world_size"] == ranks
    assert sorted(os.listdir(tmp_path)) == ["output"]


def test_other_ranks_resolve_without_creating_anything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, where = rundir.resolve_output_dir(None, "densenet201", resume_auto=False, is_rank0=False)
    assert path == os.path.join("output", "train") and where is None and os.listdir(tmp_path) == []
    path, where = rundir.resolve_output_dir(None, "densenet201", resume_auto=False, is_rank0=True)
    assert re.fullmatch(rf"output/train/{STAMP}-densenet201", path) and os.listdir(tmp_path) == []
    os.makedirs(path)
    second, _ = rundir.resolve_output_dir(None, "densenet201", resume_auto=False, is_rank0=True)
    assert second != path and not os.path.exists(second)  # <same second>-1, or a later second
    assert re.fullmatch(rf"output/train/{STAMP}-densenet201(-1)?", second)


# ----------------------------------------------------------------------------
# Item 4: disk use: hard links, and by default only checkpoint.pth and model_best.pth
# ----------------------------------------------------------------------------

def test_default_keeps_checkpoint_and_best_as_one_file_while_best_is_latest(tmp_path):
    out = str(tmp_path)
    checkpoint.save_checkpoints(tiny_state(0), out, epoch=0, is_best=True)
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "model_best.pth"]  # old: also model_0.pth, a copy
    latest, best = os.stat(tmp_path / "checkpoint.pth"), os.stat(tmp_path / "model_best.pth")
    assert latest.st_ino == best.st_ino and latest.st_nlink == 2  # one file, two names: no bytes twice
    assert set(load(tmp_path / "model_best.pth")) == set(tiny_state(0))  # the full checkpoint (was weights only)

    checkpoint.save_checkpoints(tiny_state(1), out, epoch=1, is_best=False)  # a worse epoch
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "model_best.pth"]
    assert load(tmp_path / "checkpoint.pth")["epoch"] == 1 and load(tmp_path / "model_best.pth")["epoch"] == 0
    assert os.stat(tmp_path / "model_best.pth").st_nlink == 1  # the best epoch's file, kept whole
    checkpoint.save_checkpoints(tiny_state(2), out, epoch=2, is_best=True)
    assert os.stat(tmp_path / "model_best.pth").st_ino == os.stat(tmp_path / "checkpoint.pth").st_ino
    checkpoint.save_checkpoints(tiny_state(3), out)  # mid-epoch (a preemption): checkpoint.pth only
    assert load(tmp_path / "model_best.pth")["epoch"] == 2 and load(tmp_path / "checkpoint.pth")["epoch"] == 3


def test_keep_checkpoints_n_and_all(tmp_path):
    for keep, expected in ((2, ["model_3.pth", "model_4.pth"]), ("all", [f"model_{e}.pth" for e in range(5)])):
        out = tmp_path / str(keep)
        out.mkdir()
        for epoch in range(5):
            checkpoint.save_checkpoints(tiny_state(epoch), str(out), epoch=epoch, keep=keep)
        assert sorted(n for n in os.listdir(out) if n.startswith("model_")) == expected
        assert os.stat(out / "model_4.pth").st_ino == os.stat(out / "checkpoint.pth").st_ino
        assert [load(out / n)["epoch"] for n in expected] == [int(n[6:-4]) for n in expected]
    parse = main.get_args_parser().parse_args
    assert parse(["--keep-checkpoints", "all"]).keep_checkpoints == "all"
    assert parse(["--keep-checkpoints", "3"]).keep_checkpoints == 3
    assert parse([]).keep_checkpoints is None


def test_default_never_deletes_epoch_files_it_did_not_write(tmp_path):
    # A run of the old default (every epoch kept), resumed with today's default: its history stays.
    for epoch in range(2):
        checkpoint.save_checkpoints(tiny_state(epoch), str(tmp_path), epoch=epoch, keep="all")
    checkpoint.save_checkpoints(tiny_state(2), str(tmp_path), epoch=2, is_best=True)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "model_0.pth", "model_1.pth", "model_best.pth"]


def test_no_hard_links_falls_back_to_copies(tmp_path, monkeypatch):
    # FAT/exFAT and some network file systems refuse link(2) with EPERM: a copy, atomically, instead.
    def no_links(src, dst, *a, **k):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    checkpoint.save_checkpoints(tiny_state(0), str(tmp_path), epoch=0, is_best=True, keep=1)
    names = sorted(os.listdir(tmp_path))
    assert names == ["checkpoint.pth", "model_0.pth", "model_best.pth"], names  # no temporary file left
    data = {n: (tmp_path / n).read_bytes() for n in names}
    assert data["model_0.pth"] == data["checkpoint.pth"] == data["model_best.pth"]
    assert all(os.stat(tmp_path / n).st_nlink == 1 for n in names)


def test_checkpoint_files_follow_the_umask(tmp_path):
    # Item 20: mkstemp made every checkpoint 0600 while metrics.jsonl got 0644 under umask 022.
    for mask in (0o022, 0o027):
        out = tmp_path / oct(mask)
        out.mkdir()
        old = os.umask(mask)
        try:
            checkpoint.save_checkpoints(tiny_state(0), str(out), epoch=0, is_best=True, keep=1)
            for name in ("checkpoint.pth", "model_0.pth", "model_best.pth"):
                assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o666 & ~mask, (name, oct(mask))
            rundir.append_metrics(str(out), {"epoch": 0})
            rundir.write_run_description(str(out), {"epoch": 0})
            for name in ("metrics.jsonl", "run.json"):
                assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o666 & ~mask, (name, oct(mask))
        finally:
            os.umask(old)


# ----------------------------------------------------------------------------
# Item 8: a busy output folder is refused before the dataset scan, and locked from then on
# ----------------------------------------------------------------------------

HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"pid %d on testhost" % os.getpid())
print("locked", flush=True)
time.sleep(600)
"""


def test_busy_output_dir_is_refused_before_the_dataset_scan(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = train(data, "--epochs", 1, "--output-dir", out)
    finally:
        holder.kill()
        holder.wait()
    assert_one_line_error(proc, f"--output-dir {out} is in use by another run (pid {holder.pid} on testhost)")
    assert "Data:" not in proc.stdout and "Model:" not in proc.stdout, proc.stdout  # old: after both


def test_preflight_takes_the_lock_and_the_run_keeps_it(data, tmp_path):
    out = tmp_path / "out"
    args = main.get_args_parser().parse_args([*TRAIN, "--data-path", data, "--output-dir", str(out)])
    probe = [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
             "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(out / ".lock")]
    main.preflight(args, launch_lib.job_of(args))
    try:
        assert subprocess.run(probe, capture_output=True).returncode != 0  # held from the preflight on
        lock = rundir.claim(args.output_dir, args.resume, args.overwrite, resuming=False)
        assert lock is rundir.lock_output_dir(str(out))  # the same lock: not a second one that refuses
        assert subprocess.run(probe, capture_output=True).returncode != 0
    finally:
        rundir.lock_output_dir(str(out)).release()
    assert subprocess.run(probe, capture_output=True).returncode == 0


# ----------------------------------------------------------------------------
# Item 13: storage failing outside the checkpoint write: one line, never a traceback, checkpoint kept
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["read-only", "deleted"])
def test_output_dir_failing_mid_run_is_one_line(data, tmp_path, fault):
    # Old: metrics.jsonl was written first, with open(): an OSError traceback, and the epoch's checkpoint lost.
    with tmpfs(tmp_path / "disk", size="400m") as disk:
        out = os.path.join(disk, "run")
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"), *TRAIN, "--data-path", data,
                                 "--output-dir", out, "--epochs", "3", "--keep-checkpoints", "1"],
                                env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            # Epoch 0 saved whole (model_best.pth is its last name: an untrained model gets 2 of 6 right here)
            wait_for(lambda: all(os.path.exists(os.path.join(out, n)) for n in ("model_0.pth", "model_best.pth")),
                     proc)
            if fault == "read-only":
                remount(disk, "ro")
            else:
                subprocess.run(["rm", "-rf", out], check=True)
            stdout, stderr = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        assert proc.returncode == 2, stdout + stderr
        why = "Read-only file system" if fault == "read-only" else "No such file or directory"
        assert_one_line_error(result, why)
        assert out in stderr
        if fault == "read-only":  # what was written before stays whole and loads
            ckpt = load(os.path.join(out, "checkpoint.pth"))
            assert ckpt["epoch"] >= 0 and os.path.exists(os.path.join(out, "model_0.pth"))
            assert [json.loads(l)["epoch"] for l in open(os.path.join(out, "metrics.jsonl"))][0] == 0
            remount(disk, "rw")


def test_metrics_write_failing_is_one_line_and_the_epoch_is_saved(data, tmp_path):
    # /dev/full: every write fails with ENOSPC, as on a full disk. The epoch's training reaches checkpoint.pth
    # before the metrics row is written, so the failed row costs nothing but the row.
    out = tmp_path / "out"
    assert_ok(train(data, "--epochs", 1, "--output-dir", out))
    os.remove(out / "metrics.jsonl")
    os.symlink("/dev/full", out / "metrics.jsonl")
    proc = train(data, "--epochs", 2, "--output-dir", out, "--resume", out / "checkpoint.pth")
    assert_one_line_error(proc, f"could not write {out / 'metrics.jsonl'}: No space left on device")
    assert proc.returncode == 2
    assert "Train [1] done" in proc.stdout
    ckpt = load(out / "checkpoint.pth")
    assert ckpt["position"]["epoch"] == 2  # epoch 1's training is on disk (its evaluation pending)


def test_metrics_and_run_json_on_a_full_disk_leave_whole_files(tmp_path):
    with tmpfs(tmp_path / "disk") as disk:
        rundir.append_metrics(disk, {"epoch": 0, "note": "x" * 100})
        rundir.write_run_description(disk, {"model": "densenet201"})
        fill(disk)
        with pytest.raises(UserError, match="No space left on device"):
            rundir.append_metrics(disk, {"epoch": 1, "note": "y" * 5000})
        with pytest.raises(UserError, match="run.json: No space left on device"):
            rundir.write_run_description(disk, {"model": "densenet121", "pad": "z" * 5000})
        with pytest.raises(UserError, match="checkpoint"):
            checkpoint.save_checkpoints(tiny_state(1), disk, epoch=1, is_best=True)
        lines = open(os.path.join(disk, "metrics.jsonl")).read().splitlines()
        assert [json.loads(l)["epoch"] for l in lines] == [0]  # no half line
        assert json.load(open(os.path.join(disk, "run.json"))) == {"model": "densenet201"}
        assert sorted(os.listdir(disk)) == ["filler", "metrics.jsonl", "run.json"]  # no temporary files


def test_lock_file_on_a_full_disk_is_one_line_before_any_work(data, tmp_path):
    with tmpfs(tmp_path / "disk") as disk:
        os.makedirs(os.path.join(disk, "run"))
        fill(disk)
        proc = train(data, "--epochs", 1, "--output-dir", os.path.join(disk, "run"))
    assert_one_line_error(proc, "lock file .lock (No space left on device)")
    assert "Data:" not in proc.stdout


# ----------------------------------------------------------------------------
# Item 14: --resume auto with nothing to resume in another run's folder
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("files", [["model_best.pth"], ["model_best.pth", "checkpoint.pth"]])
def test_resume_auto_without_a_checkpoint_does_not_replace_another_runs_files(data, tmp_path, files):
    # Old: "no checkpoint in ..., starting fresh", then model_best.pth overwritten and metrics.jsonl replaced.
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 7, "best_acc1": 91.0}, out / "model_best.pth")
    (out / "metrics.jsonl").write_text('{"epoch": 7}\n')
    if "checkpoint.pth" in files:
        (out / "checkpoint.pth").write_bytes(b"PK\x03\x04 cut off mid-copy")  # by name a checkpoint, unreadable
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    proc = train(data, "--epochs", 1, "--resume", "auto", "--output-dir", out)
    message = f"--resume auto: --output-dir {out} holds no checkpoint to resume"
    if "checkpoint.pth" not in files:
        assert_one_line_error(proc, message)
        assert "Data:" not in proc.stdout  # known from the names alone: before any work
    else:  # known once the checkpoint fails to load: after a warning naming it
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], proc.stderr
        assert "Epoch: [0]" not in proc.stdout
    assert "--overwrite" in proc.stderr
    assert {n: (out / n).read_bytes() for n in os.listdir(out) if n in before} == before


# ----------------------------------------------------------------------------
# Item 21: messages about files that said something else
# ----------------------------------------------------------------------------

def test_random_bytes_and_a_directory_as_resume(data, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(7, 256)) * 40)  # not a zip, not a pickle
    with pytest.raises(UserError, match="not a PyTorch checkpoint") as e:
        weights_lib.load_safe(str(junk))
    assert "could run code" not in str(e.value)
    with pytest.raises(UserError, match="is a directory"):
        weights_lib.load_safe(str(tmp_path))

    proc = train(data, "--epochs", 1, "--resume", junk, "--output-dir", tmp_path / "a")
    assert_one_line_error(proc, f"{junk}: not a PyTorch checkpoint")
    assert "could run code" not in proc.stderr

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = train(data, "--epochs", 1, "--resume", run_dir, "--output-dir", tmp_path / "b")
    assert_one_line_error(proc, f"--resume {run_dir} is a directory")
    assert f"--resume auto --output-dir {run_dir}" in proc.stderr and "no such file" not in proc.stderr


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "w.pth"
    torch.save(densenet.build_model("densenet121", num_classes=3).state_dict(), path)
    return str(path)


def test_predict_output_that_cannot_be_written_is_refused_before_predicting(data, weights, tmp_path):
    images = os.path.join(data, "val")
    with tmpfs(tmp_path / "ro") as ro:
        remount(ro, "ro")
        (tmp_path / "preds.csv").mkdir()
        for target in (os.path.join(ro, "preds.csv"), str(tmp_path / "preds.csv")):  # read-only; a directory
            proc = subprocess.run([sys.executable, os.path.join(REPO, "predict.py"), "--weights", weights,
                                   "--device", "cpu", "--output", target, images], capture_output=True, text=True,
                                  env={**os.environ, **ENV}, timeout=600)
            assert_one_line_error(proc, f"--output {target}")
            assert proc.stdout == ""  # old: every prediction printed, then a traceback
        assert os.listdir(ro) == []


def test_export_onto_a_directory_is_refused_before_exporting(weights, tmp_path):
    target = tmp_path / "exports"
    target.mkdir()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "export_onnx.py"), "--weights", weights,
                           "--output", str(target), "--no-check"], capture_output=True, text=True,
                          env={**os.environ, **ENV}, timeout=600)
    assert_one_line_error(proc, f"--output {target} is a directory")
    assert "Loaded" not in proc.stdout and os.listdir(target) == []
