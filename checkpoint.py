"""Everything on disk: checkpoints (what they hold, atomic writes, safe reads), foreign weight files, resuming,
and the output folder's lock.

Checkpoints hold only tensors and plain data, so every file is read with torch.load(weights_only=True): a
file that needs arbitrary unpickling is refused and its code never runs. The only class allowed besides is
argparse.Namespace, which the Ascend original's and torchvision's reference train.py store as 'args'.
"""
import argparse
import errno
import fcntl
import os
import pickle
import shutil
import socket
import sys
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

import densenet
import utils
from cli import UserError

# torchvision's published weights, as they sit in the torch hub cache (nothing is downloaded here).
TORCHVISION_WEIGHT_FILES = {
    "densenet121": "densenet121-a639ec97.pth",
    "densenet161": "densenet161-8d451a50.pth",
    "densenet169": "densenet169-b2777c0a.pth",
    "densenet201": "densenet201-c1103571.pth",
}


# ----------------------------------------------------------------------------
# Reading and writing files
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
            try:
                torch.save(obj, f)
            except RuntimeError as e:
                # torch.save's zip writer turns a failed write (ENOSPC, EIO, ...) into a RuntimeError
                # ("[enforce fail at inline_container.cc] ... unexpected pos"): give it back its OSError.
                raise _write_error(folder, e) from None
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


def _write_error(folder, error):
    free = shutil.disk_usage(folder).free
    if free < 1 << 20:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return OSError(errno.EIO, f"write failed ({str(error).splitlines()[0]})")


def load_safe(path, map_location="cpu"):
    """torch.load with weights_only=True: tensors and plain data only, no code from the file ever runs.
    argparse.Namespace is allowed (a plain attribute bag; the original's and torchvision's 'args')."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise UserError(f"{path}: refused to load: it needs arbitrary unpickling, which could run code "
                            f"(only tensors and plain data are accepted)")
        raise UserError(f"{path}: not a readable PyTorch checkpoint (truncated, corrupt or another file type)")
    except Exception:
        raise UserError(f"{path}: not a readable PyTorch checkpoint (truncated, corrupt or another file type)")


def extract_state_dict(checkpoint):
    """A model state_dict from our checkpoints ({'model': ...}), the Ascend original's and torchvision's
    ({'model': ...}), other trainers' ({'state_dict': ...}) or a raw state_dict, with any DataParallel/DDP
    'module.' prefix removed and fp16 weights (apex O2 saves its fp16 model) made fp32."""
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(torch.is_tensor(v) for v in checkpoint.values()):
        raise UserError("file holds no model state_dict (expected a dict of tensors, or {'model': ...})")
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k,
                        v.float() if v.dtype in (torch.float16, torch.bfloat16) else v) for k, v in checkpoint.items())


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
    state_dict, checkpoint = read_weights(path)
    if "classifier.weight" not in state_dict:
        raise UserError(f"{path}: no classifier.weight in the weights: not a DenseNet state_dict")
    weight_classes = state_dict["classifier.weight"].shape[0]
    if num_classes is not None and num_classes != weight_classes:
        raise UserError(f"{path}: the classifier has {weight_classes} classes, not --num-classes {num_classes}")
    recorded = saved_config(checkpoint).get("model")
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


def saved_config(checkpoint):
    """A checkpoint's 'args' as a dict: ours store a dict, the original's and torchvision's a Namespace."""
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return args if isinstance(args, dict) else {}


def config_to_dict(args):
    """argparse.Namespace -> plain dict, safe for weights_only loading (and readable without this code)."""
    out = {}
    for k, v in vars(args).items():
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out


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




# ----------------------------------------------------------------------------
# Our checkpoints: what they hold, where they go
# ----------------------------------------------------------------------------

def training_state(trainer, args, next_epoch, next_step, best_acc1, classes):
    """Everything a resumed run needs, as tensors and plain data only (loadable with weights_only=True).
    Called on every rank (the RNG states are gathered); only rank 0's result is written."""
    state = {
        "model": trainer.model_without_ddp.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "amp": trainer.amp.state_dict(),
        "epoch": next_epoch - 1 if next_step == 0 else next_epoch,  # the epoch these weights finished (or are in)
        "next_epoch": next_epoch,
        "next_step": next_step,
        "best_acc1": best_acc1,
        "classes": list(classes),
        "args": config_to_dict(args),
        "world_size": utils.get_world_size(),
        "rng": utils.gather_to_main(utils.rng_state(trainer.device)),  # one per rank: rank r resumes rng[r]
    }
    if trainer.ema is not None:
        state["model_ema"] = trainer.ema.state_dict()
        state["model_ema_updates"] = trainer.ema.num_updates
    return state


def save_checkpoints(state, output_dir, epoch=None, is_best=False, keep=None):
    """checkpoint.pth always; model_<epoch>.pth at epoch ends (the newest `keep`); model_best.pth on a new
    best. Rank 0 only. A failed write (a full disk) is one line; the previous files are intact."""
    if not utils.is_main_process() or not output_dir:
        return
    try:
        save_atomic(state, os.path.join(output_dir, "checkpoint.pth"))
        if epoch is not None:
            save_atomic(state, os.path.join(output_dir, f"model_{epoch}.pth"))
            if keep:
                epochs = sorted(int(n[6:-4]) for n in os.listdir(output_dir)
                                if n.startswith("model_") and n[6:-4].isdigit())
                for old in epochs[:-keep]:
                    os.remove(os.path.join(output_dir, f"model_{old}.pth"))
        if is_best:
            best = {k: state[k] for k in ("model", "epoch", "best_acc1", "classes", "args")}
            save_atomic(best, os.path.join(output_dir, "model_best.pth"))
    except OSError as e:
        raise UserError(f"could not write a checkpoint to {output_dir}: {e.strerror or e}; the previous "
                        f"checkpoint is intact") from None


# ----------------------------------------------------------------------------
# Starting from weights: --pretrained and --resume
# ----------------------------------------------------------------------------

def load_pretrained(model, model_name, path=None, log=print):
    """Load `path`, else torchvision's file from the hub cache; re-init a classifier that does not fit the
    model's classes. Everything else must match exactly."""
    if not path:
        filename = TORCHVISION_WEIGHT_FILES[model_name]
        path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
        if not os.path.isfile(path):
            raise UserError(f"--pretrained: no weights on disk; download https://download.pytorch.org/models/"
                            f"{filename} to {path} (or pass --pretrained_weight_path FILE)")
    state_dict, _ = read_weights(path)
    own = model.state_dict()
    skipped = [k for k in ("classifier.weight", "classifier.bias")
               if k in state_dict and k in own and state_dict[k].shape != own[k].shape]
    weight_classes = state_dict["classifier.weight"].shape[0] if skipped else None
    for k in skipped:
        del state_dict[k]
    mismatch = describe_mismatch(model, {**state_dict, **{k: own[k] for k in skipped}})
    if mismatch:
        raise UserError(f"{path} does not fit --model {model_name}: {mismatch}")
    model.load_state_dict(state_dict, strict=not skipped)
    log(f"Loaded pretrained weights from {path}")
    if skipped:
        log(f"Classifier re-initialised for {own['classifier.weight'].shape[0]} classes (the weights have "
            f"{weight_classes}); not loaded: {', '.join(skipped)}")


def read_resume_checkpoint(resume, output_dir):
    """(path, state_dict, checkpoint) to resume from, or (None, None, None).

    Rank 0 finds (--resume auto) and reads the checkpoint and sends it to the other ranks: only rank 0
    writes checkpoints, and on other machines the ranks may not see its output folder at all. A file that
    cannot be read is the same one-line error on every rank."""
    found, error = (None, None, None), None
    if utils.is_main_process() and resume:
        try:
            path, ckpt = find_latest_checkpoint(output_dir) if resume == "auto" else (resume, None)
            if path:
                found = (path, *read_weights(path, ckpt))
        except UserError as e:
            error = str(e)
    found, error = utils.broadcast_from_main((found, error))
    if error:
        raise UserError(error)
    return found


@dataclass
class ResumePoint:
    """Where training starts: fresh, or from a checkpoint."""
    epoch: int = 0
    step: int = 0
    best_acc1: float = 0.0
    classes: list = field(default_factory=list)
    rng: dict = None        # this rank's RNG states, restored when the first epoch starts
    path: str = None


def resume(args, resume_arg, trainer, classes, rank, world_size, log=print):
    """Load --resume's checkpoint (or --resume auto's newest) into the trainer; the ResumePoint to start from.

    Our checkpoints restore everything. The Ascend original's and torchvision's reference checkpoints
    ({'model', 'optimizer', 'lr_scheduler', 'epoch', 'args'}) restore the weights, the epoch, the momentum
    buffers and so the schedule's position; what they lack is said in one log line each."""
    point = ResumePoint(epoch=args.start_epoch, classes=list(classes))
    path, state_dict, ckpt = read_resume_checkpoint(resume_arg, args.output_dir)
    if not path:
        if resume_arg == "auto":
            if args.test_only and not args.pretrained:
                raise UserError(f"--test-only --resume auto: no checkpoint in {args.output_dir} to evaluate")
            log(f"--resume auto: no checkpoint in {args.output_dir}, starting fresh")
        return point
    model = trainer.model_without_ddp
    mismatch = describe_mismatch(model, state_dict)
    if mismatch:
        raise UserError(f"{path} does not match --model {args.model} with "
                        f"{model.classifier.out_features} classes: {mismatch}")
    _check_classes(ckpt, classes, path, args)
    model.load_state_dict(state_dict)
    point.path = path
    point.classes = list(ckpt.get("classes") or classes)
    ours = "next_epoch" in ckpt
    if trainer.ema is not None and "model_ema" in ckpt:
        trainer.ema.load_state_dict(ckpt["model_ema"])
        trainer.ema.num_updates = ckpt.get("model_ema_updates", 0)
    where = _describe_position(ckpt)
    if args.test_only:
        log(f"Evaluating {path}: weights {where}")
        return point
    if "optimizer" in ckpt:
        _load_optimizer_state(trainer.optimizer, ckpt["optimizer"], model, log)
    if ours:
        trainer.amp.load_state_dict(ckpt.get("amp"))
        point.epoch, point.step = ckpt["next_epoch"], ckpt.get("next_step", 0)
        point.best_acc1 = ckpt.get("best_acc1", 0.0)
        point.rng = _this_ranks_rng(ckpt, path, point.step, rank, world_size)
        saved_batch = saved_config(ckpt).get("batch_size", args.batch_size)
        if point.step and saved_batch != args.batch_size:  # the sampler skips next_step * batch samples
            raise UserError(f"{path} was saved mid-epoch (step {point.step}) with --batch-size {saved_batch}; "
                            f"resume it with the same --batch-size (or from an epoch-end model_<epoch>.pth)")
    else:
        point.epoch = int(ckpt.get("epoch", -1)) + 1
        _log_foreign_gaps(ckpt, point.epoch, log)
    log(f"Resumed from {path}: weights {where}; continuing at epoch {point.epoch}, step {point.step}")
    return point


def _describe_position(ckpt):
    if "epoch" not in ckpt:
        return "of unknown epoch"
    if ckpt.get("next_step"):
        return f"from epoch {ckpt['epoch']}, step {ckpt['next_step']} (saved mid-epoch)"
    return f"after epoch {ckpt['epoch']}"


def _check_classes(ckpt, classes, path, args):
    ckpt_classes = list(ckpt.get("classes") or [])
    if ckpt_classes and not args.synthetic and ckpt_classes != list(classes):
        # Output i means ckpt_classes[i]; the loader would label class folder i instead: silently wrong.
        differ = sorted(set(ckpt_classes) ^ set(classes))[:4] or "same names, other order"
        raise UserError(f"{path} was trained on other classes than {args.data_path} (differ: {differ}); "
                        f"use the same dataset, or start from it with --pretrained_weight_path")


def _this_ranks_rng(ckpt, path, step, rank, world_size):
    if ckpt.get("world_size", world_size) == world_size and ckpt.get("rng"):
        rng = ckpt["rng"]
        return rng[rank] if isinstance(rng, list) else rng  # a dict: 1-rank, older runs
    if step:
        raise UserError(f"{path} was saved mid-epoch by {ckpt['world_size']} ranks; resume it with the same "
                        f"number of ranks (or from an epoch-end model_<epoch>.pth)")
    return None


def _load_optimizer_state(optimizer, saved, model, log):
    """The optimizer's momentum buffers, from our grouping or from another one of the same parameters.

    The Ascend original and torchvision's reference put every parameter in one group, in model.parameters()
    order; we keep two (decayed weights, then BatchNorm weights and biases: trainer.param_groups). Positions
    map through the model's parameter order, which the fp16 model of apex O2 shares with the fp32 one."""
    ours = optimizer.state_dict()
    if [len(g["params"]) for g in saved["param_groups"]] == [len(g["params"]) for g in ours["param_groups"]]:
        optimizer.load_state_dict(saved)
        return
    params = [p for p in model.parameters() if p.requires_grad]
    saved_ids = [i for g in saved["param_groups"] for i in g["params"]]
    if len(saved_ids) != len(params) or len(ours["param_groups"]) != 2:
        log(f"Note: optimizer state not restored ({len(saved_ids)} parameters in the file's optimizer, "
            f"{len(params)} here): momentum starts from zero")
        return
    our_order = [i for i, p in enumerate(params) if p.ndim > 1] + [i for i, p in enumerate(params) if p.ndim <= 1]
    state = {k: saved["state"][saved_ids[model_index]] for k, model_index in enumerate(our_order)
             if saved_ids[model_index] in saved["state"]}
    optimizer.load_state_dict({"state": state, "param_groups": ours["param_groups"]})
    log(f"Optimizer: momentum buffers of {len(state)} parameters restored from the file's "
        f"{len(saved['param_groups'])} parameter group(s); learning rate and weight decay follow this run's flags")


def _log_foreign_gaps(ckpt, next_epoch, log):
    sched = ckpt.get("lr_scheduler")
    if isinstance(sched, dict) and "last_epoch" in sched and sched["last_epoch"] != next_epoch:
        log(f"Note: the file's lr_scheduler has taken {sched['last_epoch']} steps; the learning rate here is "
            f"computed from the epoch ({next_epoch}) by --lr-scheduler")
    missing = [what for key, what in (("amp", "no AMP loss-scale state (the scale restarts at its initial "
                                               "value)"),
                                      ("rng", "no RNG states (augmentation continues from a fresh seed)"))
               if key not in ckpt]
    if missing:
        log(f"Note: not in the file, so not restored: {'; '.join(missing)}")


# ----------------------------------------------------------------------------
# The output folder: one run at a time, and never another run's files
# ----------------------------------------------------------------------------

RUN_FILES = ("checkpoint.pth", "model_best.pth", "metrics.jsonl")


class OutputLock:
    """An exclusive lock on --output-dir for the whole run (flock: the kernel drops it when the process
    dies, however it dies, so no stale lock is ever left behind)."""

    def __init__(self, output_dir):
        self.path = os.path.join(output_dir, ".lock")
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise UserError(f"--output-dir {output_dir} is in use by another run ({holder}); wait for it to "
                            f"finish or use another --output-dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def release(self):
        self.file.close()


def previous_run_files(output_dir):
    """Our files in `output_dir` that belong to a run: checkpoints and the metrics file."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir)
                  if n in RUN_FILES or (n.startswith("model_") and n.endswith(".pth")))


def check_fresh_output_dir(output_dir, overwrite):
    """A fresh run (nothing to resume) must not replace another run's checkpoints or curve: one line, before
    any work starts, unless --overwrite."""
    files = previous_run_files(output_dir)
    if files and not overwrite:
        shown = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
        raise UserError(f"--output-dir {output_dir} holds another run ({shown}); continue it with --resume auto, "
                        f"choose another --output-dir, or pass --overwrite to replace it")


def start_fresh_metrics(output_dir):
    """--overwrite (or --resume auto with nothing to resume): a fresh run starts a fresh curve."""
    metrics = os.path.join(output_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
