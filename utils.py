"""Metrics, logging, distributed and checkpoint helpers shared by main.py and the tools."""
import datetime
import io
import os
import pickle
import random
import sys
import tempfile
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist

from cli import UserError  # noqa: F401  (re-exported: utils.UserError is what the modules raise)


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


def launcher_env():
    """(rank, local_rank, world_size) from torchrun's variables, or the reference's RANK_ID/RANK_SIZE, or None."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"])), int(env["WORLD_SIZE"])
    if "RANK_ID" in env and "RANK_SIZE" in env and "MASTER_ADDR" in env:
        rank = int(env["RANK_ID"])
        return rank, int(env.get("LOCAL_RANK", rank)), int(env["RANK_SIZE"])
    return None


def init_distributed(args, device):
    """Join the process group that torchrun (or the reference's RANK_ID/RANK_SIZE) describes."""
    rank, _, world_size = args.rank, args.local_rank, args.world_size
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = args.dist_backend or device.dist_backend
    timeout = datetime.timedelta(seconds=args.dist_timeout)
    init_kwargs = {}
    if device.is_accelerator and backend in ("nccl", "hccl"):
        init_kwargs["device_id"] = device.torch_device  # binds the communicator eagerly to our device
    try:
        if args.dist_url == "env://" and "TORCHELASTIC_RESTART_COUNT" in os.environ:  # under torchrun
            init_kwargs["store"] = elastic_attempt_store(rank, world_size, timeout)
        else:
            init_kwargs["init_method"] = args.dist_url
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout, **init_kwargs)
        global _control_group
        _control_group = dist.new_group(backend="gloo")
    except Exception as e:
        raise UserError(f"could not join the process group ({backend}, {args.dist_url}, rank {rank}/{world_size}): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return backend


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


def any_rank(flag):
    """True on every rank if `flag` is true on any rank."""
    if not is_dist():
        return bool(flag)
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group)
    return bool(t.item())


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


def all_reduce_sum(values, device):
    """Sum a list of numbers over all ranks (float64, so image counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_dist():
        dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------
# Metrics and logging
# ----------------------------------------------------------------------------

def accuracy_counts(output, target, topk=(1, 5)):
    """Number of correct top-k predictions for each k, as a device tensor (no host sync)."""
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, dim=1).indices
    correct = pred.eq(target.view(-1, 1))
    return torch.stack([correct[:, :min(k, maxk)].any(dim=1).sum() for k in topk])


def log(*parts, all_ranks=False):
    if all_ranks or is_main_process():
        print(*parts, flush=True)


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
    return state


def set_rng_state(state, device):
    random.setstate(pickle.loads(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if device.is_accelerator and "device" in state:
        device.module().set_rng_state(state["device"], device.index)


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------

def remove_stale_temp_files(folder):
    """Delete temporary checkpoint files left by a process killed mid-write (they are never valid checkpoints)."""
    if not folder or not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp") and ".pth." in name:
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def save_atomic(obj, path):
    """torch.save that never leaves a half-written file at `path`.

    Write to a temporary file in the same folder, flush and fsync it, then rename
    over the target (atomic on POSIX) and fsync the folder so the rename itself
    survives a power cut. A crash at any point leaves the previous file intact.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_safe(path, map_location="cpu"):
    """torch.load with weights_only=True: tensors and plain data only, no code from the file ever runs."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise UserError(f"{path}: refused to load: it needs arbitrary unpickling, which could run code "
                            f"(only tensors and plain data are accepted)")
        raise UserError(f"{path}: not a readable PyTorch checkpoint (truncated, corrupt or another file type)")
    except Exception:
        raise UserError(f"{path}: not a readable PyTorch checkpoint (truncated, corrupt or another file type)")


def extract_state_dict(checkpoint):
    """A model state_dict from our checkpoints ({'model': ...}), other trainers' ({'state_dict': ...})
    or a raw state_dict, with any DataParallel/DDP 'module.' prefix removed."""
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(torch.is_tensor(v) for v in checkpoint.values()):
        raise UserError("file holds no model state_dict (expected a dict of tensors, or {'model': ...})")
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in checkpoint.items())


def describe_mismatch(model, state_dict, limit=4):
    """One line saying which keys/shapes differ between a model and a state_dict (None if they match)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:limit])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:limit])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:limit])})")
    return "; ".join(parts) or None


def read_weights(path, checkpoint=None):
    """(state_dict, checkpoint) from any weights file we accept -- our checkpoints, other trainers'
    ({'state_dict': ...}) or a raw torchvision state_dict -- with 'module.' prefixes removed and legacy
    'norm.1'-style keys renamed. `checkpoint` is the whole dict (classes, args, ...), {} for a raw state_dict.
    Pass `checkpoint` when the file is loaded already. Shared by main.py (--pretrained, --resume),
    export_onnx.py and predict.py."""
    import densenet
    if checkpoint is None:
        checkpoint = load_safe(path)
    try:
        state_dict = extract_state_dict(checkpoint)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    is_raw = all(torch.is_tensor(v) for v in checkpoint.values())
    return densenet.convert_legacy_keys(state_dict), ({} if is_raw else checkpoint)


def build_model_from_weights(path, model_name=None, num_classes=None):
    """The model a weights file holds, in eval mode on the CPU: (model, checkpoint, model_name).

    Architecture: `model_name` if given, else the checkpoint's args['model'], else whichever DenseNet the
    keys and shapes fit (densenet201 first). Classes: from the classifier's shape (`num_classes`, if given,
    must agree). Raises UserError with a one-line reason when the file does not fit."""
    import densenet
    state_dict, checkpoint = read_weights(path)
    if "classifier.weight" not in state_dict:
        raise UserError(f"{path}: no classifier.weight in the weights: not a DenseNet state_dict")
    weight_classes = state_dict["classifier.weight"].shape[0]
    if num_classes is not None and num_classes != weight_classes:
        raise UserError(f"{path}: the classifier has {weight_classes} classes, not --num-classes {num_classes}")
    recorded = checkpoint.get("args", {}).get("model") if isinstance(checkpoint.get("args"), dict) else None
    recorded = recorded if recorded in densenet.MODELS else None
    first = model_name or recorded or "densenet201"
    candidates = [first] + ([] if model_name else [n for n in sorted(densenet.MODELS) if n != first])
    mismatch = None
    for name in candidates:
        with torch.device("meta"):  # no memory, no init: the weights are assigned below
            model = densenet.build_model(name, num_classes=weight_classes)
        problem = describe_mismatch(model, state_dict)
        if problem is None:
            model.load_state_dict(state_dict, strict=True, assign=True)
            return model.float().eval(), checkpoint, name  # float(): weights saved in fp16 run in fp32 here
        mismatch = mismatch or problem
    raise UserError(f"{path} does not fit " + (f"--model {model_name}: {mismatch}" if model_name else
                                                f"any of {', '.join(sorted(densenet.MODELS))} ({first}: {mismatch})"))


def args_to_dict(args):
    """argparse.Namespace -> plain dict, safe for weights_only loading."""
    out = {}
    for k, v in vars(args).items():
        if k == "classes":
            continue
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out


def append_metrics(output_dir, record):
    """One JSON object per epoch in <output-dir>/metrics.jsonl (rank 0 only): easy to plot, grep or load."""
    if not output_dir or not is_main_process():
        return
    import json
    with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


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


def find_latest_checkpoint(output_dir):
    """(path, loaded checkpoint) of the newest checkpoint in output_dir that loads, or (None, None)
    (for --resume auto)."""
    if not output_dir or not os.path.isdir(output_dir):
        return None, None
    candidates = [os.path.join(output_dir, n) for n in os.listdir(output_dir)
                  if n.endswith(".pth") and (n == "checkpoint.pth" or n.startswith("model_"))
                  and n != "model_best.pth"]
    for path in sorted(candidates, key=os.path.getmtime, reverse=True):
        try:
            ckpt = load_safe(path)
            if isinstance(ckpt, dict) and "model" in ckpt and "epoch" in ckpt:
                return path, ckpt
            print(f"WARNING: --resume auto: skipped {path} (not a training checkpoint)", file=sys.stderr, flush=True)
        except UserError as e:
            print(f"WARNING: --resume auto: skipped {e}", file=sys.stderr, flush=True)  # corrupt or unsafe
            continue
    return None, None


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
