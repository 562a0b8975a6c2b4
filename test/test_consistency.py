"""What is evaluated is what is saved: real gloo ranks (2 and 3, torchrun) against one process.

  * every rank evaluates the same model and EMA (BatchNorm running statistics averaged over the ranks after
    each epoch's training, Trainer.sync_buffers), and it is the one rank 0 saves: the run's reported loss and
    Acc@1 (metrics.jsonl) equal those of `--test-only` of the saved checkpoint on one process;
  * the EMA starts from the weights DDP gives every rank (rank 0's), not from each rank's own random init:
    the EMA of an unchanging model (--lr 0) is the model, on every rank and in the checkpoint;
  * during the learning-rate warm-up the EMA is the model (torchvision's reset).

Each rank's evaluated state is dumped by a wrapper around engine.evaluate_all (main.py itself saves only rank 0's).
Tolerance: the 2- or 3-rank run and the one process sum the same per-image losses in a different order and
batch composition (all-reduce of per-rank sums vs one process), so losses agree to float32 summation error:
rel 1e-6 (observed: 3e-8); Acc@1 and image counts are exact.
"""
import glob
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SMALL_RUN, assert_ok, clean_env, free_port, run_main, write_image_folder

# Dumps, per rank and per call of engine.evaluate_all, the state each rank evaluates and what it reported.
EVAL_DUMP_WRAPPER = """
import os, sys
sys.path.insert(0, {repo!r})
import torch
import engine, main

def cpu_state(module):
    return {{k: v.detach().cpu().clone() for k, v in module.state_dict().items()}}

_evaluate_all, calls = engine.evaluate_all, []
def evaluate_all(trainer, *args, **kwargs):
    state = {{"model": cpu_state(trainer.model_without_ddp),
             "ema": None if trainer.ema is None else cpu_state(trainer.ema.module)}}
    state["stats"] = _evaluate_all(trainer, *args, **kwargs)
    calls.append(1)
    name = "rank%s_call%d.pth" % (os.environ.get("RANK", "0"), len(calls))
    torch.save(state, os.path.join(os.environ["EVAL_DUMP_DIR"], name))
    return state["stats"]
engine.evaluate_all = evaluate_all
sys.exit(main.run(sys.argv[1:]))
"""

BATCH = 12  # 6 per rank on 2 ranks, 4 on 3
RUN = ["--model", "densenet121", *SMALL_RUN, "--batch-size", str(BATCH), "--seed", "7", "--epochs", "1"]
LOSS_TOL = dict(rel=1e-6, abs=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 36 training images: 3 global batches of 12; 24 validation images, not all in one batch of any rank.
    return write_image_folder(tmp_path_factory.mktemp("consistency") / "data", classes=3, train_per_class=12,
                              val_per_class=8, size=32)


def wrapped(tmp_path, name):
    wrapper = tmp_path / "eval_dump.py"
    wrapper.write_text(EVAL_DUMP_WRAPPER.format(repo=REPO))
    dumps = tmp_path / name
    dumps.mkdir()
    return str(wrapper), dumps


def torchrun(nproc, script, args, dumps):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", script, *args]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(EVAL_DUMP_DIR=dumps), capture_output=True, text=True,
                          timeout=300)


def train(tmp_path, data, nproc, *extra):
    """A 1-epoch run on `nproc` gloo ranks: (output dir, {rank: what that rank evaluated after epoch 0})."""
    script, dumps = wrapped(tmp_path, "train_dumps")
    out = tmp_path / "out"
    assert_ok(torchrun(nproc, script, [*RUN, "--data-path", data, "--output-dir", str(out), *extra], dumps))
    evaluated = {}
    for rank in range(nproc):
        files = sorted(glob.glob(str(dumps / f"rank{rank}_call*.pth")))
        assert len(files) == 1, f"rank {rank}: {files} (one call of engine.evaluate_all expected: epoch 0's)"
        evaluated[rank] = torch.load(files[0], weights_only=False)
    return out, evaluated


def metrics_row(out, epoch=0):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return next(r for r in rows if r["epoch"] == epoch)


def evaluate_test_only(tmp_path, data, checkpoint):
    """`main.py --test-only --resume CHECKPOINT --model-ema` on one process: what evaluate_all returned."""
    script, dumps = wrapped(tmp_path, "test_only_dumps")
    proc = subprocess.run([sys.executable, script, *RUN, "--data-path", data, "--output-dir", str(tmp_path / "t"),
                           "--test-only", "--resume", str(checkpoint), "--model-ema"],
                          cwd=REPO, env=clean_env(EVAL_DUMP_DIR=dumps), capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    return torch.load(dumps / "rank0_call1.pth", weights_only=False)["stats"]


def assert_same_state(actual, expected, what):
    assert list(actual) == list(expected), what
    for k in expected:
        assert torch.equal(actual[k], expected[k]), f"{what}: {k} differs"


@pytest.mark.parametrize("nproc", [3])  # (3 ranks: an uneven split of the images; 2 ranks: test_distributed)
def test_every_rank_evaluates_the_saved_model_and_ema(tmp_path, data, nproc):
    # The case: an unchanging model (--lr 0) and an EMA updated at every step. The BatchNorm statistics
    # still change (every forward updates them, each rank from its own shard).
    out, evaluated = train(tmp_path, data, nproc, "--lr", "0", "--model-ema", "--model-ema-steps", "1")
    saved = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    # The EMA of an unchanging model is the model: on every rank (its own model: an EMA that started from this
    # rank's random init, not from the weights DDP broadcast, differs here), and in the checkpoint.
    for rank, e in evaluated.items():
        assert_same_state(e["ema"], e["model"], f"rank {rank}'s EMA vs its model")
    assert_same_state(saved["model_ema"], saved["model"], "saved EMA vs saved model")
    # Every rank evaluated exactly the saved model and EMA: weights and BatchNorm statistics, bit for bit.
    for rank, e in evaluated.items():
        assert_same_state(e["model"], saved["model"], f"rank {rank}'s evaluated model vs the saved one")
        assert_same_state(e["ema"], saved["model_ema"], f"rank {rank}'s evaluated EMA vs the saved one")
    reported = metrics_row(out)
    # The same weights and statistics evaluated over the same shards: identical numbers, not merely close.
    assert reported["val_ema_loss"] == reported["val_loss"], reported
    assert reported["val_ema_acc1"] == reported["val_acc1"], reported
    # What the run reported is what the saved checkpoint gives on one process (--test-only).
    alone = evaluate_test_only(tmp_path, data, out / "checkpoint.pth")
    assert reported["val_images"] == alone["images"] == 24
    assert reported["val_acc1"] == alone["acc1"]
    assert reported["val_loss"] == pytest.approx(alone["loss"], **LOSS_TOL)
    assert reported["val_ema_acc1"] == alone["ema_acc1"]
    assert reported["val_ema_loss"] == pytest.approx(alone["ema_loss"], **LOSS_TOL)


def test_ema_is_the_model_during_lr_warmup(tmp_path, data):
    # One process, a real learning rate, epoch 0 inside --lr-warmup-epochs: each EMA update copies the model
    # (with decay 0.99, adjusted to 0.88 for this batch and length, it would otherwise lag behind).
    out = tmp_path / "out"
    assert_ok(run_main([*RUN, "--data-path", data, "--output-dir", str(out), "--lr", "0.01", "--model-ema",
                        "--model-ema-steps", "1", "--model-ema-decay", "0.99", "--lr-warmup-epochs", "2"],
                       env=clean_env(), inherit_env=False, timeout=300))
    saved = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert_same_state(saved["model_ema"], saved["model"], "EMA after a warm-up epoch vs the model")
    row = metrics_row(out)
    assert row["val_ema_loss"] == row["val_loss"], row
