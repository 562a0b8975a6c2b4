"""Distributed helpers, logging, throughput, RNG state and metrics files, shared by main.py and the tools.
Checkpoints and weight files are in checkpoint.py; everything device-specific is in device.py."""
import datetime
import io
import json
import os
import pickle
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from cli import UserError


# ----------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------

# Small host-side messages (stop requests, skipped steps, resume state, RNG states) go over a gloo group of
# their own: on GPU/NPU they then cost no device synchronisation and never queue behind DDP's all-reduces.
_control_group = None


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the job, as its launcher described it."""
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    style: str  # "torchrun" | "rank_id" (the Ascend original's RANK_ID/RANK_SIZE) | "single"


# The Ascend original's train.py rendezvous, used when RANK_ID/RANK_SIZE launches set no MASTER_ADDR/PORT.
ORIGINAL_MASTER_ADDR, ORIGINAL_MASTER_PORT = "127.0.0.1", "29688"


def launcher_env(distributed_flag=False, node_rank=0, nodes=1):
    """This process's Launch from the environment.

    torchrun sets RANK, LOCAL_RANK, WORLD_SIZE (and LOCAL_WORLD_SIZE). The Ascend original starts one
    process per device by hand with RANK_ID (the device's index on its node) and RANK_SIZE (processes per
    node) and --distributed; on several machines it adds --dist_rank (this node's index) and --world-size
    (the number of nodes), which are `node_rank` and `nodes` here. As in the original, RANK_ID/RANK_SIZE
    count only with --distributed (`distributed_flag`): a RANK_SIZE left in the environment of a
    1-device run changes nothing."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return Launch(int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"])), world,
                      int(env.get("LOCAL_WORLD_SIZE", world)), "torchrun")
    if distributed_flag and "RANK_ID" in env and "RANK_SIZE" in env:
        local_rank, per_node = int(env["RANK_ID"]), int(env["RANK_SIZE"])
        nodes = nodes or 1
        return Launch(node_rank * per_node + local_rank, local_rank, nodes * per_node, per_node, "rank_id")
    return Launch(0, 0, 1, 1, "single")


def init_distributed(launch, device, backend, dist_url="env://", timeout_s=600):
    """Join the process group of `launch` and create the gloo control group.

    The rendezvous: torchrun's store under torchrun; MASTER_ADDR/MASTER_PORT for the original's RANK_ID
    launches, or the original's fixed 127.0.0.1:29688 when those are unset."""
    if launch.style == "rank_id":
        os.environ.setdefault("MASTER_ADDR", ORIGINAL_MASTER_ADDR)
        os.environ.setdefault("MASTER_PORT", ORIGINAL_MASTER_PORT)
    timeout = datetime.timedelta(seconds=timeout_s)
    init_kwargs = {}
    if device.is_accelerator and backend == "nccl":
        # Binds the communicator eagerly to our GPU. Only for NCCL: a default group bound to an NPU makes every
        # later group (our gloo control group included) look for a backend for "npu", and gloo has none.
        init_kwargs["device_id"] = device.torch_device
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}" if dist_url == "env://" else dist_url
    if launch.rank == 0 or launch.style != "torchrun":
        # Before a join that can wait for --dist-timeout: a launch missing its peers must not look hung.
        print(f"Joining the process group: rank {launch.rank} of {launch.world_size}, {backend}, rendezvous at "
              f"{where} (waiting up to {timeout_s} s for all {launch.world_size} processes)", flush=True)
    try:
        if dist_url == "env://" and "TORCHELASTIC_RESTART_COUNT" in os.environ:  # under torchrun
            init_kwargs["store"] = elastic_attempt_store(launch.rank, launch.world_size, timeout)
        else:
            init_kwargs["init_method"] = dist_url
        dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size, timeout=timeout,
                                **init_kwargs)
        global _control_group
        _control_group = dist.new_group(backend="gloo")
    except Exception as e:
        raise UserError(f"could not join the process group ({backend}, {where}, rank {launch.rank}/"
                        f"{launch.world_size}): {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def elastic_attempt_store(rank, world_size, timeout):
    """The rendezvous store for this torchrun attempt, with its own key namespace.

    torchrun's static rendezvous (--master_addr/--master_port) keeps one TCPStore for the whole job. After
    a --max-restarts restart, the keys that init_process_group wrote in the failed attempt (each rank's
    address, barrier counters) are still there: the new ranks would read a dead peer's address and fail to
    connect, or pass a barrier early. Prefixing the keys with the attempt number gives every attempt a clean
    store, whichever rendezvous torchrun used."""
    env = os.environ
    host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    agent_hosts_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent serves it
    store = dist.TCPStore(host, port, world_size, is_master=not agent_hosts_store and rank == 0,
                          timeout=timeout, multi_tenant=True)
    return dist.PrefixStore(f"/attempt_{env['TORCHELASTIC_RESTART_COUNT']}/", store)


def cleanup_distributed():
    global _control_group
    if is_dist():
        dist.destroy_process_group()
    _control_group = None


def any_rank(*flags):
    """A tuple: for each flag, True on every rank if it is true on any rank (one small collective for all)."""
    if not is_dist():
        return tuple(bool(f) for f in flags)
    t = torch.tensor([1 if f else 0 for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group)
    return tuple(bool(x) for x in t.tolist())


def restarted_by_torchrun():
    """True in a job that torchrun --max-restarts started again after a failure."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank (a picklable object; tensors travel on the CPU)."""
    if not is_dist():
        return obj
    box = [obj if is_main_process() else None]
    dist.broadcast_object_list(box, src=0, group=_control_group)
    return box[0]


def gather_to_main(obj):
    """[rank 0's obj, rank 1's, ...] on rank 0; None on the others."""
    if not is_dist():
        return [obj]
    gathered = [None] * get_world_size() if is_main_process() else None
    dist.gather_object(obj, gathered, dst=0, group=_control_group)
    return gathered


def all_reduce(values, op="sum"):
    """Sum (or max) a list of host numbers over all ranks, in float64 on the host: image counts stay exact,
    and no device needs float64 (Ascend NPUs and HCCL have none)."""
    t = torch.tensor(values, dtype=torch.float64)
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=_control_group)
    return t.tolist()


# ----------------------------------------------------------------------------
# Metrics and logging
# ----------------------------------------------------------------------------

def accuracy_counts(output, target, topk=(1, 5)):
    """[correct top-k for each k..., images] as an int64 device tensor (no host sync)."""
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, dim=1).indices
    correct = pred.eq(target.view(-1, 1))
    return torch.stack([*(correct[:, :min(k, maxk)].any(dim=1).sum() for k in topk),
                        torch.full((), target.shape[0], dtype=torch.int64, device=target.device)])


def log(*parts):
    """Print on rank 0 only (the other ranks' logs hold their warnings)."""
    if is_main_process():
        print(*parts, flush=True)


def warn(message):
    """A warning on this rank's stderr (and its --log-file)."""
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def format_eta(seconds):
    return str(datetime.timedelta(seconds=int(max(0, seconds))))


class Throughput:
    """Images per second of wall time over a steady-state window (warm-up steps excluded).

    The trainer calls step(n) after each step; the window opens after `warmup` steps.
    The device is synchronised at both ends of the window, so queued kernels are counted.
    """

    def __init__(self, device, warmup=5):
        self.device = device
        self.warmup = warmup
        self.steps = 0
        self.images = 0
        self.start = None
        self.end = None
        self.first_step = None
        if warmup <= 0:  # no warm-up: the window opens now, so step 1 counts (else it never opened: FPS n/a)
            self.device.synchronize()
            self.start = time.perf_counter()
            self.first_step = 1

    def step(self, images):
        self.steps += 1
        if self.steps == self.warmup:
            self.device.synchronize()
            self.start = time.perf_counter()
            self.first_step = self.steps + 1
        elif self.steps > self.warmup:
            self.images += images

    def finish(self):
        if self.start is None:
            return None
        self.device.synchronize()
        self.end = time.perf_counter()
        return self.images / (self.end - self.start) if self.images else None


# ----------------------------------------------------------------------------
# Reproducibility
# ----------------------------------------------------------------------------

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state(device):
    """Every RNG the trainer draws from, as tensors and plain data (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": pickle.dumps(random.getstate()),  # bytes: plain data to torch.load(weights_only)
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if device.is_accelerator:
        state["device"] = device.module().get_rng_state(device.index)
        state["device_type"] = device.type
    return state


def set_rng_state(state, device):
    """Restore rng_state's states. The accelerator's generator only from a checkpoint of the same device type:
    a CUDA generator's state means nothing to an NPU's (and a CPU run has no such generator)."""
    random.setstate(pickle.loads(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if device.is_accelerator and "device" in state and state.get("device_type") == device.type:
        device.module().set_rng_state(state["device"], device.index)


# ----------------------------------------------------------------------------
# Metrics files
# ----------------------------------------------------------------------------

def append_metrics(output_dir, record):
    """One JSON object per epoch in <output-dir>/metrics.jsonl (rank 0 only): easy to plot, grep or load."""
    if not output_dir or not is_main_process():
        return
    with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def write_run_description(output_dir, description):
    """<output-dir>/run.json (rank 0): what the launchers' summary needs besides metrics.jsonl (world size,
    batch, device, model), as data rather than as words to grep from the log."""
    if not output_dir or not is_main_process():
        return
    with open(os.path.join(output_dir, "run.json"), "w") as f:
        json.dump(description, f, indent=1)
        f.write("\n")


class TensorBoardLogger:
    """main.py --tensorboard: the per-epoch metrics.jsonl record as scalars in <output-dir>/tensorboard.
    train_loss -> train/loss, val_acc1 -> val/acc1, lr -> lr, ...; step = epoch. Create on rank 0 only."""

    def __init__(self, output_dir):
        from torch.utils.tensorboard import SummaryWriter  # optional dependency: checked by main.validate_args
        self.writer = SummaryWriter(log_dir=os.path.join(output_dir or ".", "tensorboard"))

    def log(self, record):
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                tag = key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key
                self.writer.add_scalar(tag, value, record["epoch"])
        self.writer.flush()  # a preempted or killed run keeps every finished epoch

    def close(self):
        self.writer.close()


def tee_stdout_to(path):
    """Mirror stdout/stderr into a log file (used by --log-file)."""
    f = open(path, "a", buffering=1)

    class Tee(io.TextIOBase):
        def __init__(self, stream):
            self.stream = stream

        def write(self, s):
            self.stream.write(s)
            f.write(s)
            return len(s)

        def flush(self):
            self.stream.flush()
            f.flush()

    sys.stdout = Tee(sys.stdout)
    sys.stderr = Tee(sys.stderr)
