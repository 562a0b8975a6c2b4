"""Trust at scale: a signal, a lost peer or a failed loader never costs a trained epoch or hangs; a run stopped
mid-epoch resumes on any number of ranks with every image used once and the same learning rates; a finished
run says so.

Everything is real: `python main.py` processes (gloo ranks started with the environment torchrun gives them),
real signals sent at the moment named (during evaluation, while the loader is blocked on a FIFO), a loader
worker killed with SIGKILL as the OOM killer does, a rank killed mid-epoch. Each wait has a time limit, so a
regression fails instead of hanging the suite.
"""
import os
import re
import shutil
import signal
import time

import pytest
import torch

from conftest import REPO, SAMPLE_LOG_WRAPPER, SMALL_RUN, Proc, assert_ok, clean_env, load, metrics, one_error_line, run_main, \
    start_ranks, write_image_folder

COMMON = ["--model", "densenet121", *SMALL_RUN, "--seed", "3", "--lr", "0.01"]


# ----------------------------------------------------------------------------
# Signals during evaluation: the epoch's training is already saved
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_val_data(tmp_path_factory):
    # 24 training images; 150 validation images = 38 batches of 4: evaluation takes many step lines.
    return write_image_folder(tmp_path_factory.mktemp("trust") / "data", classes=3, train_per_class=8,
                              val_per_class=50, size=32)


def test_sigterm_during_evaluation_exits_at_once_and_the_resumed_run_evaluates_that_epoch_first(long_val_data,
                                                                                                  tmp_path):
    args = ["--data-path", long_val_data, "--output-dir", tmp_path, *COMMON, "-b", "4", "--max-steps", "2"]
    proc = Proc([*args, "--epochs", "1"], clean_env())
    proc.wait_for(r"^Test: \[1/38\]")
    sent = time.monotonic()
    proc.p.send_signal(signal.SIGTERM)
    assert proc.finish(timeout=60) == 75, proc.stdout + proc.stderr
    assert time.monotonic() - sent < 15, "the signal waited for the whole evaluation"
    assert " * Acc@1" not in proc.stdout and "Test: [38/38]" not in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert re.search(r"^Preempted by SIGTERM during the evaluation of epoch 0: the epoch's training is saved",
                     proc.stdout, re.M), proc.stdout
    ckpt = load(tmp_path / "checkpoint.pth")
    assert ckpt["epoch"] == 0 and ckpt["position"] == {**ckpt["position"], "epoch": 1, "step": 0, "evaluated": False}
    assert metrics(tmp_path) == []  # no row for an epoch that was not evaluated

    resumed = run_main([*args, "--epochs", "2", "--resume", "auto"], env=clean_env(), inherit_env=False)
    out = assert_ok(resumed)
    assert out.index("Epoch 0 was trained but not evaluated: evaluating it first") < out.index("Epoch: [1]"), out
    rows = metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [0, 1]  # no gap
    assert rows[0]["train_loss"] == ckpt["train_stats"]["train_loss"] and rows[0]["val_images"] == 150
    assert load(tmp_path / "checkpoint.pth")["position"]["evaluated"] is True


@pytest.fixture(scope="module")
def trained(long_val_data, tmp_path_factory):
    """A finished 1-epoch run, whose epoch is shorter than --warmup-steps."""
    out = tmp_path_factory.mktemp("trained")
    args = ["--data-path", long_val_data, "--output-dir", out, *COMMON, "-b", "4", "--max-steps", "2",
            "--epochs", "1", "--warmup-steps", "5"]
    return {"dir": out, "args": args, "log": assert_ok(run_main(args, env=clean_env(), inherit_env=False))}


@pytest.mark.parametrize("how", ["--test-only", "training run"])
def test_sigint_during_evaluation_stops_at_once(trained, tmp_path, how):
    ckpt = trained["dir"] / "checkpoint.pth"
    if how == "--test-only":
        args = [*trained["args"], "--test-only", "--resume", ckpt]
        expected = 128 + signal.SIGINT  # nothing to save
    else:  # the trained epoch is on disk before its evaluation: stopping is a preemption
        shutil.copy(ckpt, tmp_path / "checkpoint.pth")
        args = [*trained["args"], "--output-dir", tmp_path, "--resume", "auto", "--epochs", "2"]
        expected = 75
    proc = Proc(args, clean_env())
    proc.wait_for(r"^Test: \[1/38\]")
    proc.p.send_signal(signal.SIGINT)
    assert proc.finish(timeout=60) == expected, proc.stdout + proc.stderr
    assert " * Acc@1" not in proc.stdout and "Traceback" not in proc.stderr, proc.stdout + proc.stderr


def test_resuming_a_finished_run_trains_nothing_and_says_how_to_go_on(trained):
    before = (trained["dir"] / "metrics.jsonl").read_text()
    for resume in ("auto", str(trained["dir"] / "checkpoint.pth")):
        proc = run_main([*trained["args"], "--resume", resume], env=clean_env(), inherit_env=False)
        out = assert_ok(proc)
        assert "Nothing to train" in out and "has finished all 1 epochs" in out and "larger --epochs" in out, out
        assert "Start training" not in out and "Epoch: [" not in out and "epochs trained" not in out, out
    assert (trained["dir"] / "metrics.jsonl").read_text() == before


def test_an_epoch_shorter_than_the_warm_up_still_reports_its_images_per_second(trained):
    m = re.search(r"^Train \[0\] FPS: ([\d.]+) img/s over the whole epoch, warm-up included", trained["log"], re.M)
    assert m and float(m.group(1)) > 0, trained["log"]
    row = metrics(trained["dir"])[-1]
    assert row["fps"] is None and row["epoch_fps"] == pytest.approx(float(m.group(1)), rel=0.01)


def test_an_evaluation_of_zero_images_is_an_error_and_the_epoch_is_kept(tmp_path):
    data = write_image_folder(tmp_path / "data", classes=2, train_per_class=4, val_per_class=1, size=32)
    for c in ("class_0", "class_1"):  # every validation image unreadable
        open(os.path.join(data, "val", c, "img_0.JPEG"), "wb").write(b"not a JPEG")
    out = tmp_path / "out"
    proc = run_main(["--data-path", data, "--output-dir", out, *COMMON, "-b", "4", "--epochs", "1"],
                    env=clean_env(), inherit_env=False)
    assert proc.returncode == 2
    assert "evaluation covered 0 images (2 unreadable)" in one_error_line(proc.stderr)
    assert " * Acc@1" not in proc.stdout
    assert load(out / "checkpoint.pth")["position"]["epoch"] == 1  # the epoch's training was saved before


# ----------------------------------------------------------------------------
# Failed loaders: a dead worker, a file that never delivers
# ----------------------------------------------------------------------------

def test_a_stalled_loader_saves_the_steps_trained_so_far(data48, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(data48, data)
    # The file that the epoch's order (seed 3 + epoch 0) reads first at step 3 becomes a FIFO nobody writes:
    # a read that never returns, as on a hung network file system.
    root = data / "train"
    samples = [root / c / f for c in sorted(os.listdir(root)) for f in sorted(os.listdir(root / c))]
    path = samples[torch.randperm(len(samples), generator=torch.Generator().manual_seed(3)).tolist()[8]]
    path.unlink()
    os.mkfifo(path)
    proc = run_main(["--data-path", data, *COMMON, "-b", "4", "--epochs", "1", "--output-dir", tmp_path / "out",
                     "--data-timeout", "3"], env=clean_env(), inherit_env=False, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = one_error_line(proc.stderr)
    assert "training data (epoch 0, step 3): no batch for 3 s" in line and "checkpoint saved" in line, line
    ckpt = load(tmp_path / "out" / "checkpoint.pth")
    assert (ckpt["position"]["epoch"], ckpt["position"]["step"]) == (0, 2)  # steps 1 and 2 trained; step 3 never started
    # (SIGTERM while the loader is blocked: test_lifecycle.py)


# ----------------------------------------------------------------------------
# A peer lost mid-epoch
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("ranks", [2])  # (3 ranks, rank 0 lost: test_stop.py test_7; a dead worker: test_2)
def test_a_rank_killed_mid_epoch_leaves_a_checkpoint_and_a_line_naming_it(data48, tmp_path, ranks):
    args = ["--data-path", data48, "--output-dir", tmp_path, *COMMON, "-b", str(2 * ranks), "--epochs", "1"]
    procs = start_ranks(ranks, args)
    procs[0].wait_for(r"^Epoch: \[0\]\s+\[\s*2/")
    victim = ranks - 1
    procs[victim].kill()
    for r, proc in enumerate(procs):
        if r != victim:
            assert proc.finish(timeout=60) == 1, proc.stdout + proc.stderr
    line = one_error_line(procs[0].stderr)
    assert f"lost rank {victim} at epoch 0" in line and "checkpoint saved" in line, line
    ckpt = load(tmp_path / "checkpoint.pth")
    assert ckpt["position"]["epoch"] == 0 and ckpt["position"]["step"] >= 2

    # The restart (what torchrun --max-restarts does) continues from that step and finishes the epoch.
    procs = start_ranks(ranks, [*args, "--resume", "auto"])
    for proc in procs:
        assert proc.finish(timeout=300) == 0, proc.stdout + proc.stderr
    assert f"continuing at epoch 0, step {ckpt['position']['step']}" in procs[0].stdout
    row = metrics(tmp_path)[-1]
    # The survivors could not sum the first attempt's metrics with a peer gone: the row counts the second's.
    assert row["resumed"] is True and row["images"] == 48 - 2 * ranks * ckpt["position"]["step"]


# ----------------------------------------------------------------------------
# A mid-epoch checkpoint resumes on any number of ranks
# ----------------------------------------------------------------------------

GLOBAL_BATCH, N_TRAIN = 6, 36  # 6 steps; 36 and what is left after any step divide among 1, 2 or 3 ranks


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    base = tmp_path_factory.mktemp("elastic")
    data = write_image_folder(base / "data", classes=3, train_per_class=N_TRAIN // 3, val_per_class=1, size=32)
    wrapper = base / "wrapper.py"
    wrapper.write_text(SAMPLE_LOG_WRAPPER.format(repo=REPO))
    # cosine over one epoch: the learning rate differs at every step
    args = ["--data-path", data, *COMMON, "-b", str(GLOBAL_BATCH), "--epochs", "1", "--lr-scheduler", "cosine",
            "--lr", "0.1"]
    reference = run_main([*args, "--output-dir", base / "reference"], env=clean_env(), inherit_env=False)
    return {"base": base, "args": args, "wrapper": wrapper, "lr": step_lrs(assert_ok(reference)), "stopped": {}}


def step_lrs(log):
    return {int(step): lr for step, lr in re.findall(r"^Epoch: \[0\]\s+\[\s*(\d+)/6\].*?lr: (\S+)", log, re.M)}


def trained_samples(log_prefix, ranks, steps=None):
    """Every rank's training samples; with `steps`, only those of the first `steps` steps (a stopped attempt
    has fetched one batch more than it trained)."""
    samples = []
    for r in range(ranks):
        lines = [int(x) for x in open(f"{log_prefix}.{r}").read().split()]
        samples += lines if steps is None else lines[:steps * GLOBAL_BATCH // ranks]
    return samples


def interrupted_run(elastic, ranks):
    """A run on `ranks` ranks stopped mid-epoch by SIGTERM sent to its last rank only (the ranks agree to
    stop at the same step); its output folder and the step it stopped at. Made once per module and rank count."""
    if ranks in elastic["stopped"]:
        return elastic["stopped"][ranks]
    out = elastic["base"] / f"stopped_on_{ranks}"
    procs = start_ranks(ranks, [*elastic["args"], "--output-dir", out], script=elastic["wrapper"],
                        SAMPLE_LOG=out.with_suffix(".first"))
    procs[0].wait_for(r"^Epoch: \[0\]\s+\[\s*2/6\]")
    procs[-1].p.send_signal(signal.SIGTERM)
    for proc in procs:
        assert proc.finish(timeout=120) == 75, proc.stdout + proc.stderr
    steps = load(out / "checkpoint.pth")["position"]["step"]
    assert 2 <= steps < 6
    assert re.search(rf"^Preempted by SIGTERM \(to rank {ranks - 1}: SIGTERM\) at epoch 0 step {steps}:",
                     procs[0].stdout, re.M) if ranks > 1 else \
        re.search(rf"^Preempted by SIGTERM at epoch 0 step {steps}:", procs[0].stdout, re.M)
    elastic["stopped"][ranks] = out, steps
    return out, steps


@pytest.mark.parametrize("before, after", [(2, 1)])  # (onto more ranks, an uneven last step: test_stop.py test_8)
def test_a_run_stopped_mid_epoch_resumes_on_another_number_of_ranks(elastic, before, after, tmp_path):
    stopped, steps = interrupted_run(elastic, before)
    out = tmp_path / "out"
    shutil.copytree(stopped, out)
    procs = start_ranks(after, [*elastic["args"], "--output-dir", out, "--resume", "auto"],
                        script=elastic["wrapper"], SAMPLE_LOG=tmp_path / "second")
    for proc in procs:
        assert proc.finish(timeout=300) == 0, proc.stdout + proc.stderr
    log = procs[0].stdout
    assert f"saved by {before} rank(s), this run has {after}" in log, log

    # Every training image of the epoch used exactly once across the two attempts, from the sample indices.
    used = trained_samples(stopped.with_suffix(".first"), before, steps) + trained_samples(tmp_path / "second",
                                                                                          after)
    assert sorted(used) == list(range(N_TRAIN))
    # The learning rate at every step is the uninterrupted run's.
    lrs = step_lrs(log)
    assert sorted(lrs) == list(range(steps + 1, 7))
    assert lrs == {s: elastic["lr"][s] for s in lrs}
    row = metrics(out)[-1]
    assert (row["epoch"], row["images"], row["resumed"]) == (0, N_TRAIN, True)
