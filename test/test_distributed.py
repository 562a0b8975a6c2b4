"""Multi-process tests: real ranks (gloo on CPU) launched by torchrun and by the launcher scripts.

What is checked, and against what:
  * DDP training gives the parameters an independent re-implementation of data-parallel SGD predicts
    (the same re-implementation first reproduces a real 1-process run), and both ranks hold the same weights;
  * validation is exact: 101 images evaluated by 1, 2 and 3 processes give the same Acc@1/Acc@5, which
    are the ones computed here image by image;
  * test/train_full_8p.sh with RANK_SIZE=2, and as two "nodes" on loopback;
  * a rank killed mid-run under MAX_RESTARTS=1, on one node and on the second of two nodes: torchrun
    restarts the job, which resumes from rank 0's last checkpoint and ends with the weights of an
    uninterrupted run;
  * a failing rank ends the whole job promptly; a rank left with an all-unreadable batch skips the step
    together with the others instead of hanging; launch mistakes are one-line errors.

Every test uses its own MASTER_PORT (a free one from the OS), so they never collide with each other or with
other jobs on the machine. Each process uses one thread (OMP_NUM_THREADS=1): the ranks share 2 cores.
"""
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import REPO, SMALL_RUN, assert_ok, assert_one_line_error, clean_env, free_port, run_main

import data as data_lib  # noqa: E402  (conftest put the repo on sys.path)
import densenet  # noqa: E402

SEED = 1234
LR = 0.01
CLASSES = [f"class_{c}" for c in range(6)]  # 6 classes, so Acc@5 is not trivially 100
# Deterministic training crops: 32x32 images, the whole image (--crop-scale 1 1), no flips; and the same
# decoder as reference_sgd's torchvision pipeline (--no-fast-decode), so only the data parallelism differs.
TRAIN = ["--model", "densenet121", *SMALL_RUN, "--crop-scale", "1", "1", "--hflip-prob", "0", "--no-fast-decode",
         "--lr", str(LR), "--lr-scheduler", "step", "--seed", str(SEED), "--epochs", "1"]
# The in-process reference computations must use the same reduction order as the 1-thread ranks.
pytestmark = pytest.mark.usefixtures("torch_one_thread")
ACC = re.compile(r" \* Acc@1 (\S+) Acc@5 (\S+) \((\d+) images\)")


def torchrun(nproc, script_args, env=None, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *script_args]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(**(env or {})), capture_output=True, text=True,
                          timeout=timeout)


def write_folder(root, counts, size=32, seed=0):
    """An ImageNet-layout folder: counts = {split: [images per class]}; square size x size noisy colours."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 226, (len(CLASSES), 3))
    for split, per_class in counts.items():
        for c, n in enumerate(per_class):
            folder = os.path.join(root, split, CLASSES[c])
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                pixels = np.clip(colours[c] + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"img_{i:03d}.png"))
    return str(root)


def samples_of(split_root):
    """(path, class index) in the order ImageFolder numbers them: classes sorted, then files sorted."""
    return [(os.path.join(split_root, c, f), i) for i, c in enumerate(sorted(os.listdir(split_root)))
            for f in sorted(os.listdir(os.path.join(split_root, c)))]


def training_order(n, epoch=0):
    """The design: one permutation of the training set per epoch from seed + epoch, shared by all ranks."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()


# ----------------------------------------------------------------------------
# 1. DDP training == data-parallel SGD
# ----------------------------------------------------------------------------
#
# Why not simply "2 processes == 1 process"? With BatchNorm the two are *not* the same computation:
# each rank normalises with the statistics of its own half of the global batch. --sync-bn would make
# them identical, but torch's SyncBatchNorm does not run on CPU (main.py now refuses it there with a
# one-line error). So the expectation is computed here, independently of main.py's training loop, for
# W data-parallel replicas:
#   * all replicas start from rank 0's initial weights (DDP broadcasts them; rank r seeds seed + r);
#   * the global batch k is order[k*B:(k+1)*B] of the epoch's permutation, and rank r takes every W-th
#     sample of it (the sampler gives rank r order[r::W]), so the union is the 1-process batch;
#   * each replica's loss is the mean over its B/W samples, with BatchNorm batch statistics over those
#     B/W samples; DDP averages the gradients, i.e. the mean over the global batch;
#   * BatchNorm running statistics: DDP broadcasts rank 0's buffers to the others before every forward, so
#     each rank's follow rank 0's up to the last step, then that step's own half; at the end of the epoch the
#     ranks average them (Trainer.sync_buffers), so that every rank evaluates, and rank 0 saves, the same.
# For W = 1 this is plain SGD, which must reproduce a real 1-process run of main.py: that validates the
# re-implementation (crops, normalisation, init, weight-decay groups, momentum). For W = 2 it must
# reproduce the 2-process run; and W = 1 and W = 2 must differ measurably, so the check has teeth.
# Tolerance: only summation order differs (all-reduce, kernels for batch 2 vs 4): ~1e-6 relative.

GLOBAL_BATCH, STEPS = 4, 3
TOL = dict(rtol=1e-4, atol=1e-5)


def reference_sgd(train_root, world, batch=GLOBAL_BATCH, steps=STEPS, lr=LR, momentum=0.9, weight_decay=1e-4):
    torch.manual_seed(SEED)  # main.py: utils.seed_everything(seed + rank), then builds the model
    model = densenet.build_model("densenet121", num_classes=len(CLASSES))
    model.to(memory_format=torch.channels_last)  # main.py's default on CPU
    model.train()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # BatchNorm weights and biases: not decayed
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=momentum)
    criterion = nn.CrossEntropyLoss()
    samples = samples_of(train_root)
    order = training_order(len(samples))
    transform = data_lib.train_transform(32, "bilinear", (1.0, 1.0), 0.0)
    normalize = data_lib.DeviceNormalize(torch.device("cpu"), channels_last=True)
    buffers = dict(model.named_buffers())
    per_rank = {}  # each rank's buffers after its own last forward
    for k in range(steps):
        global_batch = order[k * batch:(k + 1) * batch]
        grads = [torch.zeros_like(p) for p in model.parameters()]
        rank0_buffers = {n: b.clone() for n, b in buffers.items()}
        for r in reversed(range(world)):  # rank 0 last: its running-stat updates are the ones kept
            for n, b in buffers.items():
                b.copy_(rank0_buffers[n])
            shard = global_batch[r::world]
            images = normalize(torch.stack([transform(Image.open(samples[i][0]).convert("RGB")) for i in shard]))
            targets = torch.tensor([samples[i][1] for i in shard])
            model.zero_grad(set_to_none=True)
            criterion(model(images), targets).backward()
            per_rank[r] = {n: b.clone() for n, b in buffers.items()}
            for g, p in zip(grads, model.parameters()):
                g += p.grad
        for g, p in zip(grads, model.parameters()):
            p.grad = g / world
        optimizer.step()
    for n, b in buffers.items():  # the epoch-end average of the running statistics over the ranks
        if b.is_floating_point():
            b.copy_(sum(per_rank[r][n] for r in range(world)) / world)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# Runs main.run() under torchrun exactly as `torchrun main.py ...` would, and also saves every rank's
# weights at each checkpoint (main.py saves only rank 0's), to check the ranks agree.
RANK_DUMP_WRAPPER = """
import os, sys
sys.path.insert(0, {repo!r})
import torch
import checkpoint
import main
_state = checkpoint.training_state
def training_state(*args, **kwargs):  # (called on every rank; rank 0 writes the result)
    state = _state(*args, **kwargs)
    torch.save(state["model"], os.path.join(os.environ["RANK_DUMP_DIR"], "rank%s.pth" % os.environ["RANK"]))
    return state
checkpoint.training_state = training_state
sys.exit(main.run(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    # 12 training images = exactly 3 global batches of 4: no padding, no partial batch.
    return write_folder(tmp_path_factory.mktemp("ddp") / "data", {"train": [2] * 6, "val": [1] * 6})


@pytest.fixture(scope="module")
def runs(train_data, tmp_path_factory):
    """A 1-process and a 2-process training run with the same global batch, same seed, same samples."""
    base = tmp_path_factory.mktemp("ddp_runs")
    args = [*TRAIN, "--data-path", train_data, "--batch-size", str(GLOBAL_BATCH), "--max-steps", str(STEPS)]
    one = assert_ok(run_main([*args, "--output-dir", str(base / "1p")], env=clean_env(), inherit_env=False, timeout=300))
    wrapper = base / "rank_dump.py"
    wrapper.write_text(RANK_DUMP_WRAPPER.format(repo=REPO))
    (base / "ranks").mkdir()
    two = assert_ok(torchrun(2, [str(wrapper), *args, "--output-dir", str(base / "2p")],
                      env={"RANK_DUMP_DIR": base / "ranks"}))
    return {"dir": base, "log1": one, "log2": two}


def load_model(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_state_close(actual, expected, what):
    assert list(actual) == list(expected), what
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], **TOL, msg=lambda m: f"{what}: {k}: {m}")


def max_param_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())


def test_sampler_shards_are_the_global_batch():
    # The design the reference relies on, checked on the sampler itself: rank r of W gets order[r::W].
    for n, world in ((12, 2), (13, 2), (12, 3)):
        order = training_order(n)
        shards = []
        for r in range(world):
            s = data_lib.ResumableDistributedSampler(n, world, r, SEED)
            s.set_epoch(0)
            shards.append([key[1] if isinstance(key, tuple) else key for key in s])
        assert [order[r::world] for r in range(world)] == shards  # (no padding: each sample once)


def test_one_process_run_matches_reference_sgd(runs, train_data):
    assert "world size 1" in runs["log1"] and "batch 4" in runs["log1"]
    expected = reference_sgd(os.path.join(train_data, "train"), world=1)
    assert_state_close(load_model(runs["dir"] / "1p" / "checkpoint.pth"), expected, "1 process vs reference")


def test_two_process_ddp_matches_data_parallel_sgd(runs, train_data):
    log = runs["log2"]
    assert "world size 2; global batch 4 = 2 x 2" in log
    assert re.search(r"Train \[0\] done in .*images 12 ", log), log  # all 12 samples, summed over ranks
    assert len(re.findall(r"^Train \[0\] FPS: ", log, re.M)) == 1  # only rank 0 logs
    train_root = os.path.join(train_data, "train")
    expected2 = reference_sgd(train_root, world=2)
    assert_state_close(load_model(runs["dir"] / "2p" / "checkpoint.pth"), expected2, "2 processes vs reference")
    # The check has teeth: per-rank BatchNorm makes 2 processes differ from 1 by far more than the tolerance.
    expected1 = reference_sgd(train_root, world=1)
    assert max_param_diff(expected1, expected2) > 100 * TOL["atol"]
    assert max_param_diff(load_model(runs["dir"] / "1p" / "checkpoint.pth"),
                          load_model(runs["dir"] / "2p" / "checkpoint.pth")) > 100 * TOL["atol"]


def test_both_ranks_hold_the_same_weights(runs):
    r0 = torch.load(runs["dir"] / "ranks" / "rank0.pth", weights_only=True)
    r1 = torch.load(runs["dir"] / "ranks" / "rank1.pth", weights_only=True)
    saved = load_model(runs["dir"] / "2p" / "checkpoint.pth")
    params = {n for n, _ in densenet.build_model("densenet121", num_classes=len(CLASSES)).named_parameters()}
    for k in params:
        # Same averaged gradients, same optimizer steps: bit-identical parameters on every rank.
        assert torch.equal(r0[k], r1[k]), k
        assert torch.equal(r0[k], saved[k]), k
    # BatchNorm running statistics too: each rank updated them from its own half-batch in its last forward,
    # and the ranks averaged them before saving and evaluating: what is evaluated is what is saved.
    for k in set(saved) - params:
        assert torch.equal(r0[k], r1[k]) and torch.equal(r0[k], saved[k]), k


# ----------------------------------------------------------------------------
# 2. Exact evaluation with 1, 2 and 3 processes
# ----------------------------------------------------------------------------

def reference_accuracy(model_state, val_root):
    model = densenet.build_model("densenet121", num_classes=len(CLASSES))
    model.load_state_dict(model_state)
    model.eval()
    transform = data_lib.eval_transform(32, 32)
    normalize = data_lib.DeviceNormalize(torch.device("cpu"))
    samples = samples_of(val_root)
    with torch.no_grad():
        images = normalize(torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in samples]))
        output = model(images)
    assert torch.isfinite(output).all()
    targets = torch.tensor([t for _, t in samples])
    top5 = output.topk(5, dim=1).indices
    acc1 = 100 * (top5[:, 0] == targets).sum().item() / len(samples)
    acc5 = 100 * (top5 == targets[:, None]).any(dim=1).sum().item() / len(samples)
    return f"{acc1:.3f}", f"{acc5:.3f}"


def test_evaluation_is_exact_for_1_and_3_processes(runs, tmp_path):
    # 101 validation images (17 x 5 + 16): not divisible by 3 or the batch 6, so any padding, dropping or double
    # counting would change the count or the accuracy. (2 ranks: every 2-rank run's evaluation, test_consistency.)
    root = write_folder(tmp_path / "data", {"train": [1] * 6, "val": [17, 17, 17, 17, 17, 16]}, seed=1)
    ckpt = str(runs["dir"] / "1p" / "checkpoint.pth")
    args = ["--model", "densenet121", *SMALL_RUN, "--data-path", root, "--test-only", "--resume", ckpt,
            "--batch-size", "6", "--output-dir", str(tmp_path / "out")]
    results = {}
    for nproc in (1, 3):
        proc = run_main(args, env=clean_env(), inherit_env=False, timeout=300) if nproc == 1 else \
            torchrun(nproc, ["main.py", *args])
        log = assert_ok(proc)
        assert f"world size {nproc}" in log
        found = ACC.findall(log)
        assert len(found) == 1, log  # rank 0 alone reports
        results[nproc] = found[0]
    expected = (*reference_accuracy(load_model(ckpt), os.path.join(root, "val")), "101")
    assert results == {1: expected, 3: expected}


# ----------------------------------------------------------------------------
# 3. + 4. The 8p launcher: 2 ranks on one node, and 2 nodes on loopback
# ----------------------------------------------------------------------------

LAUNCHER_ARGS = ["--model", "densenet121", *SMALL_RUN, "--batch-size", "8"]


def launcher(env, data, output_root, *extra):
    return subprocess.Popen(["bash", os.path.join(REPO, "test", "train_full_8p.sh"), f"--data_path={data}",
                             "--epochs=1", *LAUNCHER_ARGS, *extra],
                            cwd=REPO, env=clean_env(OUTPUT_ROOT=output_root, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(popen, timeout=400):
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        out, err = popen.communicate()
    return subprocess.CompletedProcess(popen.args, popen.returncode, out, err)


@pytest.fixture(scope="module")
def launcher_data(tmp_path_factory):
    # 32 images: 4 global batches of 8 per epoch, enough for a steady-state FPS after 1 warm-up step.
    return write_folder(tmp_path_factory.mktemp("launcher") / "data", {"train": [6, 6, 5, 5, 5, 5],
                                                                       "val": [2] * 6}, seed=2)


def test_train_full_8p_two_ranks(launcher_data, tmp_path):
    out = tmp_path / "output"
    proc = finish(launcher({"RANK_SIZE": 2, "MASTER_PORT": free_port()}, launcher_data, out))
    assert_ok(proc)
    log0, log1 = out / "0" / "train_0.log", out / "1" / "train_1.log"
    assert log0.is_file() and log1.is_file()
    text0 = log0.read_text()
    assert "world size 2; global batch 8 = 2 x 4" in text0
    assert re.search(r"^Train \[0\] FPS: \d+\.\d+ img/s", text0, re.M), text0
    assert not (out / "1" / "checkpoint.pth").exists()  # only rank 0 checkpoints
    assert (out / "0" / "checkpoint.pth").is_file()
    summary = dict(line.split(" = ", 1) for line in
                   (out / "0" / "DenseNet121_for_PyTorch_bs8_2p_acc.log").read_text().splitlines())
    assert summary["RankSize"] == "2" and summary["BatchSize"] == "8"
    float(summary["ActualFPS"]), float(summary["TrainAccuracy"]), float(summary["TrainingTime"])
    assert summary["DeviceType"] == "cpu"


def test_two_nodes_on_loopback(launcher_data, tmp_path):
    port = free_port()
    nodes = [launcher({"NNODES": 2, "NODE_RANK": r, "RANK_SIZE": 1, "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": port}, launcher_data, tmp_path / f"node{r}") for r in (0, 1)]
    node0, node1 = finish(nodes[0]), finish(nodes[1])
    assert_ok(node0)
    assert_ok(node1)
    text0 = (tmp_path / "node0" / "0" / "train_0.log").read_text()
    assert "world size 2; global batch 8 = 2 x 4" in text0
    assert ACC.search(text0)
    assert (tmp_path / "node1" / "1" / "train_1.log").is_file()  # the second node logs its own rank
    assert "no run.json from rank 0" in node1.stdout, node1.stdout  # the summary is node 0's to write
    assert not list((tmp_path / "node1").glob("*/*_acc.log"))  # no bogus summary from rank 1's log
    assert (tmp_path / "node0" / "0" / "DenseNet121_for_PyTorch_bs8_2p_acc.log").is_file()


# ----------------------------------------------------------------------------
# 5. + 6. Failures
# ----------------------------------------------------------------------------

def test_a_failing_rank_ends_the_job_promptly(tmp_path):
    root = write_folder(tmp_path / "data", {"train": [4] * 6, "val": [1] * 6}, seed=3)
    samples = samples_of(os.path.join(root, "train"))
    # Corrupt the first sample of rank 1 only (rank r reads order[r::2]); rank 0 never sees it and goes
    # on into its first step, where DDP waits for rank 1 -- which must not leave it hanging.
    bad = samples[training_order(len(samples))[1]][0]
    with open(bad, "wb") as f:
        f.write(b"not an image")
    start = time.monotonic()
    proc = torchrun(2, ["main.py", *TRAIN, "--data-path", root, "--batch-size", "4", "--max-bad-images", "0",
                        "--output-dir", str(tmp_path / "out"), "--dist-timeout", "300"], timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert f"error: more than --max-bad-images 0 unreadable training images (latest: {bad})" in proc.stderr, \
        proc.stderr[-4000:]
    # Every rank stops at the same step (exit 2; torchrun itself exits 1), after rank 0 kept the steps trained.
    position = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)["position"]
    assert position["epoch"] == 0 and position["step"] >= 1


def test_a_rank_whose_whole_batch_is_unreadable_skips_the_step_with_the_others(tmp_path):
    # Both images of rank 1's first local batch are corrupt (rank r's k-th batch: order[k*4 + r::2][:2]).
    # Within --max-bad-images that is no error, but rank 1 has nothing to train on at step 0; if it
    # skipped the step alone, DDP's all-reduces would pair up across different steps and the job would
    # hang until --dist-timeout. All ranks must skip it together.
    root = write_folder(tmp_path / "data", {"train": [2] * 6, "val": [1] * 6}, seed=4)
    samples = samples_of(os.path.join(root, "train"))
    order = training_order(len(samples))
    for i in (order[1], order[3]):
        with open(samples[i][0], "wb") as f:
            f.write(b"not an image")
    proc = torchrun(2, ["main.py", *TRAIN, "--data-path", root, "--batch-size", "4", "--max-bad-images", "5",
                        "--output-dir", str(tmp_path / "out"), "--dist-timeout", "120"], timeout=300)
    log = assert_ok(proc)
    # Step 0 trained nobody (rank 0's 2 good images were skipped too); steps 1 and 2 trained 8 images.
    assert re.search(r"Train \[0\] done in .*images 8 +unreadable images 2", log), log
    assert (tmp_path / "out" / "checkpoint.pth").is_file()


def worker_pid(output_root, rank):
    """PID of the main.py process with RANK=rank whose command line names output_root, or None."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue  # gone, or not ours to read
        if "main.py" in cmdline and str(output_root) in cmdline and f"RANK={rank}" in environ:
            return int(pid)
    return None


# --keep-checkpoints 1: model_0.pth marks the end of epoch 0 for the kill (no longer kept by default).
# No mixup: rank 0 saves when its peer dies, and the dead rank's RNG state (mixup's draws) dies with it.
RESTART_RUN = ["--epochs=2", "--keep-checkpoints", "1"]


def final_model(output_dir):
    ckpt = torch.load(output_dir / "checkpoint.pth", map_location="cpu", weights_only=True)
    return ckpt["epoch"], ckpt["model"]


@pytest.fixture(scope="module")
def uninterrupted(launcher_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert_ok(finish(launcher({"RANK_SIZE": 2, "MASTER_PORT": free_port()}, launcher_data, out, *RESTART_RUN)))
    return final_model(out / "0")


def kill_once_epoch_0_is_saved(jobs, checkpoint, victim_root, rank):
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and all(j.poll() is None for j in jobs) and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = worker_pid(victim_root, rank)
    assert victim is not None, f"rank {rank} already gone before the kill"
    os.kill(victim, 9)  # SIGKILL: no handler runs, no checkpoint of its own
    # Before the per-attempt store, restarted ranks hung in process-group set-up: keep the wait short.
    # The killed rank's peers fail (a traceback on stderr) before torchrun restarts them all: rc 0 is the verdict.
    return [assert_ok(finish(j, timeout=240), allow_traceback=True) for j in jobs]


def assert_resumed_once(log_path):
    """The restart went on from where the rank died: rank 0 saved the step it had reached (or the epoch's end)."""
    log = log_path.read_text()
    # (during a step, or at the barrier of the epoch's end, depending on when the kill lands)
    assert re.search(r"^error: lost rank 1 at (epoch \d+ step \d+|the end of epoch \d+) ", log, re.M), log
    resumes = re.findall(r"^Resumed from \S+: weights .*; continuing at epoch (\d+), step (\d+)$", log, re.M)
    assert len(resumes) == 1, log
    assert (int(resumes[0][0]), int(resumes[0][1])) >= (1, 0), log  # from a checkpoint, not from scratch


def assert_same_weights(actual, expected):
    (epoch_a, model_a), (epoch_e, model_e) = actual, expected
    assert epoch_a == epoch_e == 1  # the last of --epochs=2
    for name, value in model_e.items():
        assert torch.equal(model_a[name], value), name


def test_a_torchrun_restart_resumes_from_the_last_checkpoint(launcher_data, uninterrupted, tmp_path):
    # Rank 1 dies once epoch 0's checkpoint exists. With MAX_RESTARTS=1 the launcher's torchrun restarts
    # both ranks, which rejoin through the same static rendezvous store and continue from the checkpoint,
    # ending with the weights of a run never interrupted: same data, learning rates and mixup draws.
    out = tmp_path / "killed"
    job = launcher({"RANK_SIZE": 2, "MAX_RESTARTS": 1, "MASTER_PORT": free_port()}, launcher_data, out,
                   *RESTART_RUN)
    kill_once_epoch_0_is_saved([job], out / "0" / "model_0.pth", out, rank=1)
    assert_resumed_once(out / "0" / "train_0.log")
    assert (out / "0" / "DenseNet121_for_PyTorch_bs8_2p_acc.log").is_file()
    assert_same_weights(final_model(out / "0"), uninterrupted)


def test_a_restart_across_two_nodes_resumes_without_a_shared_folder(launcher_data, uninterrupted, tmp_path):
    # Two "nodes" with output folders of their own: node 1 never sees rank 0's checkpoints, so it must get
    # them from rank 0 (else it starts at epoch 0 and the ranks fall out of step). Node 1's rank dies.
    port = free_port()
    nodes = [launcher({"NNODES": 2, "NODE_RANK": r, "RANK_SIZE": 1, "MAX_RESTARTS": 1, "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": port}, launcher_data, tmp_path / f"node{r}", *RESTART_RUN) for r in (0, 1)]
    kill_once_epoch_0_is_saved(nodes, tmp_path / "node0" / "0" / "model_0.pth", tmp_path / "node1", rank=1)
    assert_resumed_once(tmp_path / "node0" / "0" / "train_0.log")
    assert not list((tmp_path / "node1").glob("*/*.pth"))
    assert_same_weights(final_model(tmp_path / "node0" / "0"), uninterrupted)


def test_distributed_flag_without_launcher_is_one_line_error(tmp_path):
    root = write_folder(tmp_path / "data", {"train": [1] * 6, "val": [1] * 6})
    proc = run_main(["--model", "densenet121", *SMALL_RUN, "--data-path", root, "--distributed",
                     "--output-dir", str(tmp_path / "out")], env=clean_env(), inherit_env=False, timeout=120)
    assert_one_line_error(proc, "--distributed needs a launcher")


def test_indivisible_global_batch_under_torchrun_is_one_line_error(tmp_path):
    root = write_folder(tmp_path / "data", {"train": [1] * 6, "val": [1] * 6})
    proc = torchrun(2, ["main.py", "--model", "densenet121", *SMALL_RUN, "--data-path", root,
                        "--output-dir", str(tmp_path / "out"), "--batch-size", "5"], timeout=120)
    assert proc.returncode != 0
    message = "error: --batch-size 5 is the global batch and must divide evenly among 2 ranks"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    # One line per rank that got to say it: torchrun stops the other rank as soon as the first one exits.
    assert errors and set(errors) == {message}, proc.stderr[-3000:]
    assert not re.search(r"\[rank\d+\]:.*Traceback", proc.stderr), proc.stderr[-3000:]  # no worker traceback


def test_sync_bn_on_cpu_is_one_line_error(tmp_path):
    # Checked before the process group is joined, so one process with a launcher's variables shows it
    # (torch's SyncBatchNorm raised a traceback from inside DDP on CPU).
    root = write_folder(tmp_path / "data", {"train": [1] * 6, "val": [1] * 6})
    proc = run_main(["--model", "densenet121", *SMALL_RUN, "--data-path", root, "--sync-bn", "--batch-size", "4",
                     "--output-dir", str(tmp_path / "out")],
                    env=clean_env(RANK=0, LOCAL_RANK=0, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port()),
                    inherit_env=False, timeout=120)
    assert_one_line_error(proc, "--sync-bn: torch's SyncBatchNorm runs on GPU/NPU only")
