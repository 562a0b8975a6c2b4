"""The stop protocol (stop.py), at the moments where two ways of stopping used to meet and lose a checkpoint.

Everything is real: main.py processes (gloo ranks with torchrun's environment, the repository's srun stand-in
with --kill-on-bad-exit, torchrun itself), real signals sent at the moment named, a loader worker killed with
SIGKILL as the OOM killer does, SIGSTOP/SIGCONT, a pipe nobody reads, a FIFO for a file that does not come.
Each wait has a time limit, so a regression fails instead of hanging the suite. Numbers in the names are the
defects of issue 23 that each test reproduces.
"""
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, SAMPLE_LOG_WRAPPER, SMALL_RUN, Proc, children, assert_ok, clean_env, free_port, load, metrics, one_error_line, \
    run_main, start_ranks, write_image_folder

COMMON = ["--model", "densenet121", *SMALL_RUN, "--seed", "3", "--lr", "0.01"]
FAKE_SLURM = os.path.join(REPO, "test", "fake_slurm")


def position(path):
    p = load(path)["position"]
    return p["epoch"], p["step"], p["evaluated"]


def no_traceback(*procs):
    for proc in procs:
        assert "Traceback" not in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------
# 1. Preemption under srun --kill-on-bad-exit: every task gets SIGTERM, no task leaves before the save
# ----------------------------------------------------------------------------

def srun(args, env_extra=None, **kw):
    env = clean_env(PATH=FAKE_SLURM + os.pathsep + os.environ["PATH"], SLURM_JOB_ID="4711", SLURM_NTASKS="2",
                    SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(free_port()),
                    **(env_extra or {}))
    return Proc(args, env, script=os.path.join(FAKE_SLURM, "srun"), **kw)


def test_1_srun_preemption_saves_the_step_and_a_restart_right_after_is_not_refused(data48, tmp_path):
    out = tmp_path / "out"
    args = ["--kill-on-bad-exit=1", sys.executable, os.path.join(REPO, "main.py"), "--data-path", data48,
            "--output-dir", out, *COMMON, "--model", "densenet201", "-b", "4", "--epochs", "1", "--workers", "0",
            "--log-file", str(tmp_path / "train_{rank}.log")]  # (DenseNet-201: a save long enough to be seen)
    exits = tmp_path / "exits.log"
    job = srun(args, {"FAKE_SRUN_EXIT_LOG": str(exits)})
    job.wait_for(r"^Epoch: \[0\]\s+\[\s*2/12\]")
    job.p.send_signal(signal.SIGTERM)  # srun passes it to every task, as Slurm's --signal=TERM does
    assert job.finish(timeout=120) == 75, job.stdout + job.stderr
    epoch, step, _ = position(out / "checkpoint.pth")
    assert epoch == 0 and 2 <= step < 12
    # No task left before the checkpoint was on disk: with --kill-on-bad-exit, the first task to exit makes srun
    # stop the others, rank 0 in the middle of its save (the old code's other ranks left right away).
    saved_at = os.stat(out / "checkpoint.pth").st_mtime
    ended = [float(line.split(" at ")[1]) for line in exits.read_text().splitlines()]
    assert len(ended) == 2 and min(ended) >= saved_at, (ended, saved_at)
    assert not glob.glob(str(out / ".*.tmp")), os.listdir(out)
    logs = [open(tmp_path / f"train_{r}.log").read() for r in range(2)]
    assert "Traceback" not in "".join(logs) and "second SIGTERM" not in "".join(logs), logs
    assert f"Preempted by SIGTERM at epoch 0 step {step}: checkpoint saved to" in logs[0], logs[0]

    # At once: the killed job's loader workers must not hold the folder's lock.
    again = srun([*args, "--resume", "auto"])
    assert again.finish(timeout=300) == 0, again.stdout + again.stderr
    assert f"continuing at epoch 0, step {step}" in again.stdout
    assert metrics(out)[-1]["images"] == 48


def test_1_a_killed_trainers_loader_workers_do_not_keep_its_folder_locked(data48, tmp_path):
    out = tmp_path / "out"
    args = ["--data-path", data48, "--output-dir", out, *COMMON, "-b", "4", "--epochs", "1", "--workers", "2"]
    first = Proc(args, clean_env())
    first.wait_for(r"^Epoch: \[0\]\s+\[\s*2/12\]")
    workers = children(first.p.pid)
    assert workers, "no loader workers"
    os.kill(first.p.pid, signal.SIGKILL)  # the trainer only: its workers live on for seconds
    first.p.wait()
    assert any(os.path.exists(f"/proc/{w}") for w in workers)  # (still there: the moment that matters)
    proc = run_main([*args, "--resume", "auto", "--max-steps", "1"], env=clean_env(), inherit_env=False)
    assert "in use by another run" not in proc.stderr, proc.stderr
    assert_ok(proc)


# ----------------------------------------------------------------------------
# 2. A dead loader worker under DDP
# ----------------------------------------------------------------------------

def test_2_a_dead_loader_worker_on_one_rank_stops_every_rank_after_the_save(data48, tmp_path):
    procs = start_ranks(2, ["--data-path", data48, "--output-dir", tmp_path, *COMMON, "-b", "4", "--epochs", "1",
                            "--workers", "1"])
    procs[0].wait_for(r"^Epoch: \[0\]\s+\[\s*2/12\]")
    os.kill(children(procs[1].p.pid)[0], signal.SIGKILL)  # what the OOM killer does
    codes = [proc.finish(timeout=120) for proc in procs]
    assert codes == [1, 1], [p.stdout + p.stderr for p in procs]
    no_traceback(*procs)
    line = one_error_line(procs[1].stderr)
    assert "a data loading worker died" in line and "checkpoint saved to" in line, line
    epoch, step, _ = position(tmp_path / "checkpoint.pth")
    assert epoch == 0 and 2 <= step < 12
    assert f"Stopped at epoch 0 step {step} with the other ranks (rank 1: training data" in procs[0].stdout


# ----------------------------------------------------------------------------
# 3. The epoch's commit (checkpoint, model_best.pth, metrics row) is not interrupted, and never half-done
# ----------------------------------------------------------------------------

def wait_for_temp_file(folder, proc, timeout=120):
    """Until a checkpoint is being written in `folder` (its temporary file exists)."""
    deadline = time.monotonic() + timeout
    while not glob.glob(os.path.join(folder, ".checkpoint.pth.*.tmp")):
        assert proc.p.poll() is None and time.monotonic() < deadline, proc.stdout + proc.stderr
        time.sleep(0.002)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_3_a_signal_during_the_epochs_commit(data48, tmp_path, signum):
    args = ["--data-path", data48, "--output-dir", tmp_path, *COMMON, "-b", "8", "--epochs", "2"]
    proc = Proc(args, clean_env())
    proc.wait_for(r"^ \* Acc@1")  # epoch 0 evaluated: its commit begins
    wait_for_temp_file(tmp_path, proc)
    proc.p.send_signal(signum)
    code = proc.finish(timeout=60)
    if signum == signal.SIGTERM:  # the commit completes, then the run stops
        assert code == 75, proc.stdout + proc.stderr
        assert "Preempted by SIGTERM at the end of epoch 0: checkpoint saved" in proc.stdout, proc.stdout
    ckpt = load(tmp_path / "checkpoint.pth")
    if ckpt["position"]["evaluated"]:  # whatever the moment: "evaluated, best" only with its model_best.pth
        assert ckpt["best_acc1"] == 0 or os.path.exists(tmp_path / "model_best.pth")
    resumed = run_main([*args, "--resume", "auto"], env=clean_env(), inherit_env=False)
    assert_ok(resumed)
    assert [row["epoch"] for row in metrics(tmp_path)] == [0, 1]  # one row per epoch, whatever was redone
    best = load(tmp_path / "checkpoint.pth")["best_acc1"]
    assert best == 0 or os.path.exists(tmp_path / "model_best.pth")


# ----------------------------------------------------------------------------
# 4. A signal that reaches one rank only, in the epoch's last step
# ----------------------------------------------------------------------------

def test_4_a_signal_to_one_rank_in_the_last_step_stops_every_rank_together(data48, tmp_path):
    args = ["--data-path", data48, "--output-dir", tmp_path, *COMMON, "-b", "4", "--epochs", "2"]
    procs = start_ranks(2, args)
    procs[0].wait_for(r"^Epoch: \[0\]\s+\[11/12\]")
    procs[1].p.send_signal(signal.SIGTERM)
    codes = [proc.finish(timeout=120) for proc in procs]
    assert codes == [75, 75], [p.stdout + p.stderr for p in procs]
    no_traceback(*procs)
    assert "Preempted by SIGTERM (to rank 1: SIGTERM)" in procs[0].stdout or \
        "Preempted by SIGTERM" in procs[0].stdout, procs[0].stdout
    procs = start_ranks(2, [*args, "--resume", "auto"])
    assert [proc.finish(timeout=300) for proc in procs] == [0, 0], [p.stdout + p.stderr for p in procs]
    assert [row["epoch"] for row in metrics(tmp_path)] == [0, 1]


# ----------------------------------------------------------------------------
# 5. The EMA at resume
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_without_ema(data48, tmp_path_factory):
    out = tmp_path_factory.mktemp("no_ema")
    assert_ok(run_main(["--data-path", data48, "--output-dir", out, *COMMON, "-b", "8", "--epochs", "1"],
                       env=clean_env(), inherit_env=False))
    return out


def test_5_an_ema_switched_on_at_resume_starts_from_the_loaded_weights(data48, trained_without_ema, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained_without_ema, out)
    # lr 0 and an EMA update every step: the model does not move, so an EMA that starts from it stays it.
    proc = run_main(["--data-path", data48, "--output-dir", out, *COMMON, "-b", "8", "--epochs", "2", "--lr", "0",
                     "--model-ema", "--model-ema-steps", "1", "--resume", "auto"], env=clean_env(), inherit_env=False)
    assert "it starts from the loaded weights" in assert_ok(proc), proc.stdout
    row = metrics(out)[-1]
    assert row["epoch"] == 1 and row["val_ema_loss"] == pytest.approx(row["val_loss"], rel=1e-6), row


def test_5_torchvisions_model_ema_resumes(data48, trained_without_ema, tmp_path):
    from torch.optim.swa_utils import AveragedModel  # what torchvision's reference ExponentialMovingAverage is
    ckpt = load(trained_without_ema / "checkpoint.pth")
    import densenet
    model = densenet.build_model("densenet121", num_classes=3)
    model.load_state_dict(ckpt["model"])
    ema = AveragedModel(model)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.mul_(0.5)  # an EMA that differs from the model
    theirs = {"model": ckpt["model"], "model_ema": ema.state_dict(), "epoch": 0,
              "optimizer": ckpt["optimizer"]}
    assert "n_averaged" in theirs["model_ema"] and all(k == "n_averaged" or k.startswith("module.")
                                                         for k in theirs["model_ema"])
    torch.save(theirs, tmp_path / "torchvision.pth")
    as_model = {"model": {k[len("module."):]: v for k, v in ema.state_dict().items() if k != "n_averaged"}}
    torch.save(as_model, tmp_path / "ema_as_model.pth")
    flags = ["--data-path", data48, *COMMON, "-b", "8", "--test-only"]
    proc = run_main([*flags, "--model-ema", "--resume", tmp_path / "torchvision.pth"], env=clean_env(),
                    inherit_env=False)
    reference = run_main([*flags, "--resume", tmp_path / "ema_as_model.pth"], env=clean_env(), inherit_env=False)
    ema_loss = [l for l in assert_ok(proc).splitlines() if l.startswith("Test: EMA loss")]
    plain_loss = [l for l in assert_ok(reference).splitlines() if l.startswith("Test: loss")]
    # The loss only: the rest of the line is a wall time.
    assert ema_loss and plain_loss and ema_loss[0].split()[3] == plain_loss[0].split()[2], \
        proc.stdout + reference.stdout


# ----------------------------------------------------------------------------
# 6. Retention never deletes the file it just wrote
# ----------------------------------------------------------------------------

def test_6_keep_checkpoints_keeps_the_epoch_just_written(tmp_path):
    import checkpoint
    for epoch in (2, 3, 8, 9):  # 8 and 9: left by an attempt that went further
        torch.save({"epoch": epoch}, tmp_path / f"model_{epoch}.pth")
    checkpoint.save_checkpoints({"epoch": 4}, str(tmp_path), epoch=4, keep=2)
    kept = sorted(int(n[6:-4]) for n in os.listdir(tmp_path) if n.startswith("model_"))
    assert kept == [3, 4, 8, 9]
    assert torch.load(tmp_path / "model_4.pth")["epoch"] == 4


# ----------------------------------------------------------------------------
# 9, 10, 11, 12, 16: signals at start-up, at the rendezvous, as a preemption notice, past a full pipe, while
# suspended
# ----------------------------------------------------------------------------

def test_9_sigterm_at_the_rendezvous_stops_at_once(data48, tmp_path):
    proc = Proc(["--data-path", data48, "--output-dir", tmp_path, *COMMON, "-b", "4", "--dist-timeout", "300"],
                clean_env(RANK=0, WORLD_SIZE=2, LOCAL_RANK=0, LOCAL_WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=free_port()))
    proc.wait_for("^Joining the process group")  # rank 1 never comes
    time.sleep(1)
    sent = time.monotonic()
    proc.p.send_signal(signal.SIGTERM)
    assert proc.finish(timeout=30) == 128 + signal.SIGTERM
    assert time.monotonic() - sent < 10
    assert proc.stderr.strip() == "stopped by SIGTERM during joining the process group (nothing to save)", proc.stderr


def test_10_sigusr1_is_a_preemption_notice(data48, tmp_path):
    proc = Proc(["--data-path", data48, "--output-dir", tmp_path, *COMMON, "-b", "4", "--epochs", "1"], clean_env())
    proc.wait_for(r"^Epoch: \[0\]\s+\[\s*2/12\]")
    proc.p.send_signal(signal.SIGUSR1)
    assert proc.finish(timeout=60) == 75, proc.stdout + proc.stderr
    epoch, step, _ = position(tmp_path / "checkpoint.pth")
    assert epoch == 0 and 2 <= step < 12
    assert f"Preempted by SIGUSR1 at epoch 0 step {step}: checkpoint saved" in proc.stdout


def test_11_a_full_stdout_pipe_does_not_hold_a_stop_back(tmp_path):
    # 300 unreadable images: 300 warnings an epoch, far more than a pipe holds (64 KiB), nobody reading it.
    data = write_image_folder(tmp_path / "data", classes=3, train_per_class=8, val_per_class=2, size=32)
    for i in range(300):
        (tmp_path / "data" / "train" / f"class_{i % 3}" / f"broken_{i}.JPEG").write_bytes(b"not a jpeg")
    log = tmp_path / "train.log"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"), "--data-path", data, "--output-dir",
                             tmp_path / "out", *COMMON, "-b", "4", "--epochs", "50", "--max-bad-images", "100000",
                             "--log-file", log], cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (log.exists() and log.stat().st_size > 200_000 and "Epoch: [1]" in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)  # the old code blocked in a write to the full pipe: never
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert code == 75, log.read_text()[-3000:]
    assert "Preempted by SIGTERM" in log.read_text()
    assert position(tmp_path / "out" / "checkpoint.pth")[0] >= 1


def feed_fifo(path, content, proc, timeout=60):
    """Write `content` into the FIFO once its reader (proc) opens it; never block when proc is gone."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while nobody reads it
            break
        except OSError:
            assert proc.p.poll() is None and time.monotonic() < deadline, proc.stdout + proc.stderr
            time.sleep(0.05)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "wb") as fifo:
        fifo.write(content)


def test_12_time_suspended_is_not_a_data_stall(tmp_path):
    data = tmp_path / "data"
    write_image_folder(data, classes=3, train_per_class=16, val_per_class=2, size=32)
    # The file step 3 reads first (seed 3, epoch 0: position 8 of the order) becomes a FIFO that gets its bytes
    # only after the process has been suspended (SIGSTOP) longer than --data-timeout.
    root = data / "train"
    samples = [root / c / f for c in sorted(os.listdir(root)) for f in sorted(os.listdir(root / c))]
    path = samples[torch.randperm(len(samples), generator=torch.Generator().manual_seed(3)).tolist()[8]]
    content = path.read_bytes()
    path.unlink()
    os.mkfifo(path)
    proc = Proc(["--data-path", data, "--output-dir", tmp_path / "out", *COMMON, "-b", "4", "--epochs", "1",
                 "--data-timeout", "4"], clean_env())
    proc.wait_for(r"^Epoch: \[0\]\s+\[\s*1/12\]")  # then step 3's batch is fetched (one ahead): the FIFO
    time.sleep(0.5)
    proc.p.send_signal(signal.SIGSTOP)
    time.sleep(5)  # longer than --data-timeout
    proc.p.send_signal(signal.SIGCONT)
    feed_fifo(path, content, proc)
    assert proc.finish(timeout=120) == 0, proc.stdout + proc.stderr
    assert "no batch for" not in proc.stderr


def test_16_ctrl_c_during_the_imports_is_one_line():
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"), "--help"], cwd=REPO, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # importing torch takes seconds
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT, out + err
    assert err.strip() == "stopped by SIGINT during start-up (nothing to save)", err


# ----------------------------------------------------------------------------
# 7. A lost rank 0: the survivors save
# ----------------------------------------------------------------------------

def test_7_when_rank_0_is_lost_the_lowest_survivor_saves(data48, tmp_path):
    args = ["--data-path", data48, "--output-dir", tmp_path, *COMMON, "-b", "6", "--epochs", "1"]
    procs = start_ranks(3, args)
    procs[0].wait_for(r"^Epoch: \[0\]\s+\[\s*2/8\]")
    procs[0].kill()
    assert [proc.finish(timeout=120) for proc in procs[1:]] == [1, 1], [p.stdout + p.stderr for p in procs]
    no_traceback(*procs[1:])
    assert "lost rank 0" in one_error_line(procs[1].stderr.split("\n", 1)[0] + "\n")
    assert "checkpoint saved to" in procs[1].stderr, procs[1].stderr
    assert "checkpoint saved" not in procs[2].stderr
    epoch, step, _ = position(tmp_path / "checkpoint.pth")
    assert epoch == 0 and 2 <= step < 8
    procs = start_ranks(3, [*args, "--resume", "auto"])
    assert [proc.finish(timeout=300) for proc in procs] == [0, 0, 0], [p.stdout + p.stderr for p in procs]
    assert f"continuing at epoch 0, step {step}" in procs[0].stdout


# ----------------------------------------------------------------------------
# 8, 15: the epoch's sample order across a resume
# ----------------------------------------------------------------------------

def trained(prefix, ranks, steps=None, per_rank=None):
    samples = []
    for r in range(ranks):
        lines = [int(x) for x in open(f"{prefix}.{r}").read().split()]
        samples += lines if steps is None else lines[:steps * per_rank]
    return samples


def stop_at_step(args, out, wrapper, ranks=1, step=3, **env):
    procs = start_ranks(ranks, [*args, "--output-dir", out], script=wrapper, SAMPLE_LOG=out.with_suffix(".first"),
                        **env) if ranks > 1 else [Proc([*args, "--output-dir", out], clean_env(
                            SAMPLE_LOG=out.with_suffix(".first")), script=wrapper)]
    procs[0].wait_for(rf"^Epoch: \[0\]\s+\[\s*{step}/")
    procs[-1].p.send_signal(signal.SIGTERM)
    assert [p.finish(timeout=120) for p in procs] == [75] * ranks, [p.stdout + p.stderr for p in procs]
    return position(out / "checkpoint.pth")[1]


def sample_logged(tmp_path, classes, per_class):
    """An image folder, and a main.py wrapper that logs every training sample each rank loads."""
    data = write_image_folder(tmp_path / "data", classes=classes, train_per_class=per_class, val_per_class=1, size=32)
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(SAMPLE_LOG_WRAPPER.format(repo=REPO))
    return data, wrapper


def test_8_one_rank_resumed_on_three_uses_every_image_once(tmp_path):
    # 44 images, global batch 12: the last step has 8, which three ranks share 3, 3, 2 (DistributedSampler
    # would pad them to 9, training one image twice: 45 images in an epoch of 44).
    data, wrapper = sample_logged(tmp_path, 4, 11)
    args = ["--data-path", data, *COMMON, "-b", "12", "--epochs", "1"]
    out = tmp_path / "out"
    steps = stop_at_step(args, out, wrapper, step=1)
    procs = start_ranks(3, [*args, "--output-dir", out, "--resume", "auto"], script=wrapper,
                        SAMPLE_LOG=tmp_path / "second")
    assert [p.finish(timeout=300) for p in procs] == [0, 0, 0], [p.stdout + p.stderr for p in procs]
    used = trained(out.with_suffix(".first"), 1, steps, 12) + trained(tmp_path / "second", 3)
    assert sorted(used) == list(range(44))
    assert metrics(out)[-1]["images"] == 44


def test_15_a_mid_epoch_resume_with_another_seed_continues_the_saved_order(tmp_path):
    data, wrapper = sample_logged(tmp_path, 3, 8)
    args = ["--data-path", data, *COMMON, "-b", "4", "--epochs", "2"]
    out = tmp_path / "out"
    steps = stop_at_step(args, out, wrapper, step=2)
    other_seed = [a if a != "3" else "4" for a in args]
    proc = Proc([*other_seed, "--output-dir", out, "--resume", "auto", "--epochs", "1"],
                clean_env(SAMPLE_LOG=tmp_path / "second"), script=wrapper)
    assert proc.finish(timeout=300) == 0, proc.stdout + proc.stderr
    assert "was trained with --seed 3: epoch 0 goes on in that seed's sample order" in proc.stdout, proc.stdout
    used = trained(out.with_suffix(".first"), 1, steps, 4) + trained(tmp_path / "second", 1)
    assert sorted(used) == list(range(24))


def test_15_a_mid_epoch_resume_after_the_training_set_changed_is_one_line(tmp_path):
    data, wrapper = sample_logged(tmp_path, 3, 8)
    args = ["--data-path", data, *COMMON, "-b", "4", "--epochs", "1"]
    out = tmp_path / "out"
    stop_at_step(args, out, wrapper, step=2)
    for name in ("added_0", "added_1"):
        shutil.copy(tmp_path / "data" / "train" / "class_0" / "img_0.JPEG", tmp_path / "data" / "train" / "class_0" /
                    f"{name}.JPEG")
    proc = run_main([*args, "--output-dir", out, "--resume", "auto"], env=clean_env(), inherit_env=False)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "24 training images" in line and "has 26 now" in line and "--restart-epoch" in line, line
    proc = run_main([*args, "--output-dir", out, "--resume", "auto", "--restart-epoch"], env=clean_env(),
                    inherit_env=False)
    assert "epoch 0 starts again from its first step" in assert_ok(proc)
    assert metrics(out)[-1]["images"] == 26


# ----------------------------------------------------------------------------
# 14. A torchrun restart continues its own run, not the newest one in the folder
# ----------------------------------------------------------------------------

def test_14_a_torchrun_restart_finds_its_own_run(data48, tmp_path):
    # Another run of the same model, newer than this job's (it finished while this job was running, say): the
    # newest run under output/train, which the old code took over when torchrun restarted this job.
    root = tmp_path / "output" / "train"
    assert_ok(run_main(["--data-path", data48, *COMMON, "-b", "4", "--epochs", "1", "--max-steps", "1"],
                       cwd=tmp_path, env=clean_env(), inherit_env=False))
    newest = root / "20991231-235959-densenet121"
    os.rename(glob.glob(str(root / "*"))[0], newest)
    newest_ckpt = (newest / "checkpoint.pth").read_bytes()
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--max-restarts", "1", "--master_port", str(free_port()), os.path.join(REPO, "main.py"),
                            "--data-path", data48, *COMMON, "-b", "4", "--epochs", "2"],
                           cwd=tmp_path, env=clean_env(LOGLEVEL="ERROR"), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not [p for p in glob.glob(str(root / "*" / "checkpoint.pth")) if not p.startswith(str(newest))]:
            assert job.poll() is None and time.monotonic() < deadline  # epoch 0 trained: its folder has one
            time.sleep(0.05)
        ours = [p for p in glob.glob(str(root / "*")) if p != str(newest)][0]
        os.kill(max(children(job.pid)), signal.SIGKILL)  # a rank dies: torchrun restarts the job
        out, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, out
    assert f"Output: {os.path.relpath(ours, tmp_path)} (this job's run, restarted" in out, out
    assert (newest / "checkpoint.pth").read_bytes() == newest_ckpt  # untouched
    assert [row["epoch"] for row in metrics(ours)][-1] == 1
