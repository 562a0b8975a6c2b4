"""Logging, throughput, RNG state and TensorBoard, shared by main.py and the tools. Where this process sits in
its job is launch.py, the collectives comm.py; checkpoints are checkpoint.py, the run folder rundir.py; everything
device-specific is device.py."""
import datetime
import os
import pickle
import random
import sys
import time

import numpy as np
import torch

from comm import is_main_process


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
# TensorBoard (the metrics files themselves are written by checkpoint.py: everything on disk)
# ----------------------------------------------------------------------------

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
