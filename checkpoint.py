"""Everything on disk: checkpoints (what they hold, atomic writes, safe reads), foreign weight files, resuming,
the output folder (where it is, its lock, what a run keeps there) and the run's other files (metrics.jsonl,
run.json). Every write failure (a full disk, a folder made read-only or deleted mid-run) is a one-line UserError.

Checkpoints hold only tensors and plain data, so every file is read with torch.load(weights_only=True): a
file that needs arbitrary unpickling is refused and its code never runs. The only class allowed besides is
argparse.Namespace, which the Ascend original's and torchvision's reference train.py store as 'args'.
"""
import argparse
import contextlib
import errno
import fcntl
import json
import os
import pickle
import re
import shutil
import socket
import sys
import tempfile
import time
import zipfile
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
        if name.startswith(".") and name.endswith(".tmp") and (".pth." in name or name.startswith(".run.json.")):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


@contextlib.contextmanager
def _replacing(path):
    """A temporary name beside `path` for the body to create the new file at; then renamed over `path` (atomic on
    POSIX) and the folder fsynced, so that the rename itself survives a power cut. A crash or an error at any
    point leaves the previous `path` intact, and the temporary file is removed (one left by a killed process is
    removed by remove_stale_temp_files). Files the body creates get the mode the umask gives, as any other."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        if os.path.lexists(tmp):  # left by an earlier process of the same pid
            os.unlink(tmp)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def save_atomic(obj, path):
    """torch.save that never leaves a half-written file at `path`: written to a temporary file in the same
    folder, flushed and fsynced, then renamed over the target (_replacing)."""
    with _replacing(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            # torch.save's zip writer turns a failed write (ENOSPC, EIO, ...) into a RuntimeError
            # ("[enforce fail at inline_container.cc] ... unexpected pos"): give it back its OSError.
            raise _write_error(os.path.dirname(os.path.abspath(path)), e) from None
        f.flush()
        os.fsync(f.fileno())


# os.link's errors that mean "this file system has no hard links" (FAT/exFAT, some FUSE and network shares).
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS, errno.EXDEV}


def link_atomic(source, path):
    """Make `path` the same file as `source` (a hard link: no bytes written, no space used) without ever leaving
    a missing or partial `path`: link to a temporary name, then rename it over `path` (_replacing). Where the
    file system has no hard links, an atomic copy instead (as timm's checkpoint saver does). Returns "link" or
    "copy"."""
    with _replacing(path) as tmp:
        try:
            os.link(source, tmp)
            return "link"
        except OSError as e:
            if e.errno not in _NO_HARD_LINKS:
                raise
        _copy_file(source, tmp)
        return "copy"


def _copy_file(source, target):
    with open(source, "rb") as src, open(target, "wb") as dst:
        try:
            shutil.copyfileobj(src, dst, 16 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        finally:
            os.fchmod(dst.fileno(), os.fstat(src.fileno()).st_mode & 0o777)


def _fsync_folder(folder):
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_error(folder, error):
    try:
        full = shutil.disk_usage(folder).free < 1 << 20
    except OSError:  # the folder itself is gone
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return OSError(errno.EIO, f"write failed ({str(error).splitlines()[0]})")


def describe_os_error(e):
    """An OSError as a few words, saying what the usual cause is when it is not obvious."""
    words = e.strerror or str(e)
    if e.errno == errno.ENOENT:
        words += " (was the folder deleted or moved?)"
    elif e.errno == errno.EROFS:
        words += " (the file system was made read-only)"
    return words


def load_safe(path, map_location="cpu"):
    """torch.load with weights_only=True: tensors and plain data only, no code from the file ever runs.
    argparse.Namespace is allowed (a plain attribute bag; the original's and torchvision's 'args')."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: {_why_unloadable(path, e)}") from None


def _why_unloadable(path, error):
    """Why torch.load(weights_only=True) failed, in the user's terms."""
    if not _looks_like_torch_save(path):
        return "not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)"
    if isinstance(error, pickle.UnpicklingError) and "global" in str(error).lower():
        # The file names a Python callable to import and call while loading: that is how a pickle runs code.
        return ("refused to load: it needs arbitrary unpickling, which could run code (only tensors and plain "
                "data are accepted)")
    if isinstance(error, OSError):
        return f"cannot read it ({describe_os_error(error)})"
    return "not a readable PyTorch checkpoint (truncated, corrupt or another file type)"


def _looks_like_torch_save(path):
    """torch.save writes a zip archive (torch >= 1.6) or, in the legacy format, a pickle (PROTO opcode first)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        return zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)
    except OSError:
        return True  # unreadable: let the caller's error speak


def check_writable_file(path, flag):
    """Before the work that produces it: `path` can be written (its folder exists or can be made, and takes a
    new file; `path` is not a folder). One line naming `flag` if not. Nothing is left behind."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory: give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there ({describe_os_error(e)})") from None


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
    candidates = [os.path.join(output_dir, n) for n in resumable_checkpoint_files(output_dir)]
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

def training_state(trainer, args, next_epoch, next_step, best_acc1, classes, *, pending=None, partial=None,
                   all_ranks=True):
    """Everything a resumed run needs, as tensors and plain data only (loadable with weights_only=True).

    pending: the train metrics of epoch next_epoch - 1 when it is saved before its evaluation (a resumed run
    evaluates it first). partial: the metric sums [loss, correct@1, correct@5, images] of an epoch stopped
    mid-way, so that its metrics.jsonl row counts both attempts. Called on every rank (the RNG states are
    gathered) unless all_ranks is False (a peer is gone: rank 0's RNG state only); rank 0's result is written."""
    rng = utils.rng_state(trainer.device)
    state = {
        "model": trainer.model_without_ddp.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "amp": trainer.amp.state_dict(),
        "epoch": next_epoch - 1 if next_step == 0 else next_epoch,  # the epoch these weights finished (or are in)
        "next_epoch": next_epoch,
        "next_step": next_step,
        # The position in the epoch's global sample order: what a run on any number of ranks resumes from.
        "samples_done": next_step * args.batch_size,
        "best_acc1": best_acc1,
        "classes": list(classes),
        "args": config_to_dict(args),
        "world_size": utils.get_world_size(),
        "rng": utils.gather_to_main(rng) if all_ranks else [rng],  # one per rank: rank r resumes rng[r]
        "evaluated": pending is None,
    }
    if pending is not None:
        state["train_stats"] = dict(pending)
    if partial is not None:
        state["partial_epoch"] = [float(x) for x in partial]
    if trainer.ema is not None:
        state["model_ema"] = trainer.ema.state_dict()
        state["model_ema_updates"] = trainer.ema.num_updates
    return state


def keep_checkpoints_arg(text):
    """--keep-checkpoints: a number of epochs, or 'all' (argparse type)."""
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of epochs or 'all', got {text!r}") from None


def save_checkpoints(state, output_dir, epoch=None, is_best=False, keep=None):
    """Write `state` as checkpoint.pth and, at an epoch's end, give it its other names. Rank 0 only.

    checkpoint.pth: always (the file --resume auto continues from). model_best.pth (is_best): the same file,
    hard-linked, so it costs no space while the best epoch is the latest; it stays the best epoch's full
    checkpoint when checkpoint.pth moves on (the rename gives checkpoint.pth a new file). model_<epoch>.pth
    (`epoch` given, `keep` set): hard links as well; `keep` N keeps the newest N of them, 'all' every one
    (torchvision's and the Ascend original's behaviour), None none (and deletes none). Where the file system
    has no hard links, copies. No collective: rank 0 can save after losing a peer. A failed write (a full
    disk, a folder made read-only or deleted) is one line; the files written before are intact."""
    if not utils.is_main_process() or not output_dir:
        return
    latest = os.path.join(output_dir, "checkpoint.pth")
    try:
        save_atomic(state, latest)
        if epoch is not None and keep:
            link_atomic(latest, os.path.join(output_dir, f"model_{epoch}.pth"))
            if keep != "all":
                epochs = sorted(int(n[6:-4]) for n in os.listdir(output_dir)
                                if n.startswith("model_") and n.endswith(".pth") and n[6:-4].isdigit())
                for old in epochs[:-keep]:
                    os.remove(os.path.join(output_dir, f"model_{old}.pth"))
        if is_best:
            link_atomic(latest, os.path.join(output_dir, "model_best.pth"))
    except OSError as e:
        raise UserError(f"could not write a checkpoint to {output_dir}: {describe_os_error(e)}; the files "
                        f"written before are intact") from None


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
    pending: dict = None    # train metrics of epoch `epoch - 1`, trained but not evaluated: evaluate it first
    partial: list = None    # metric sums of the first epoch's interrupted attempt (Preempted.partial)


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
        point.rng = _this_ranks_rng(ckpt, rank, world_size, log)
        if ckpt.get("evaluated", True) is False and point.epoch > 0:
            point.pending = dict(ckpt.get("train_stats") or {})
        if point.step:
            point.partial = ckpt.get("partial_epoch")
        saved_batch = saved_config(ckpt).get("batch_size", args.batch_size)
        if point.step and saved_batch != args.batch_size:  # the epoch goes on with the same global batch
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


def _this_ranks_rng(ckpt, rank, world_size, log):
    """This rank's saved RNG states, or None. On another number of ranks than the checkpoint's, the states of
    ranks that no longer exist are dropped and new ranks start from their seed: augmentation does not depend
    on them (it is a function of seed, epoch and sample), only mixup/cutmix and dropout draws do."""
    rng = ckpt.get("rng")
    if not rng:
        return None
    if not isinstance(rng, list):  # 1-rank runs of older versions: a dict
        rng = [rng]
    saved_ranks = ckpt.get("world_size", len(rng))
    if saved_ranks != world_size or len(rng) != world_size:
        kept = min(len(rng), world_size)
        log(f"Note: the checkpoint was saved by {saved_ranks} rank(s), this run has {world_size}: RNG states "
            f"restored for ranks 0..{kept - 1}" + (f", {len(rng) - kept} dropped" if len(rng) > kept else "")
            + (f"; ranks {kept}..{world_size - 1} start from their seed" if world_size > kept else ""))
    return rng[rank] if rank < len(rng) else None


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

# Where a run without --output-dir goes (relative to the current folder), one new folder per run, as timm's
# output/train/<time>-<model>: a plain `python main.py` never fills the folder it is started from.
DEFAULT_OUTPUT_ROOT = os.path.join("output", "train")


def resolve_output_dir(output_dir, model, resume_auto, is_rank0, root=DEFAULT_OUTPUT_ROOT):
    """(the run's output folder, a line saying where it is or None): --output-dir as given, else a folder of
    its own under `root`: with --resume auto the newest run of `model` there that holds a checkpoint, else a
    new <YYYYmmdd-HHMMSS>-<model> (-1, -2, ... when that exists). Nothing is created here.

    Only rank 0 decides: it is the only rank that reads or writes the folder (it reads the checkpoint and
    sends it to the other ranks). On the other ranks a default stays `root`, which they never touch."""
    if output_dir is not None:
        return output_dir, None
    if not is_rank0:
        return root, None
    if resume_auto:
        found = newest_run(root, model)
        if found:
            return found, f"Output: {found} (--resume auto: the newest {model} run under {root})"
    base = os.path.join(root, time.strftime("%Y%m%d-%H%M%S") + f"-{model}")
    path, n = base, 0
    while os.path.lexists(path):
        n += 1
        path = f"{base}-{n}"
    return path, (f"Output: {path} (no --output-dir given: a new folder for this run" +
                  ("; --resume auto found no earlier run of " + model if resume_auto else "") + ")")


def newest_run(root, model):
    """The newest <time>-<model>[-n] folder under `root` holding a checkpoint to resume, or None."""
    pattern = re.compile(rf"^(\d{{8}}-\d{{6}})-{re.escape(model)}(?:-(\d+))?$")
    runs = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        m = pattern.match(name)
        if m and resumable_checkpoint_files(os.path.join(root, name)):
            runs.append((m.group(1), int(m.group(2) or 0), name))
    return os.path.join(root, max(runs)[2]) if runs else None


def resumable_checkpoint_files(output_dir):
    """The files --resume auto considers (checkpoint.pth, model_<epoch>.pth and other model_*.pth but the best),
    by name only (find_latest_checkpoint loads them)."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir) if n.endswith(".pth") and n != "model_best.pth"
                  and (n == "checkpoint.pth" or n.startswith("model_")))


def prepare_output_dir(output_dir, overwrite, resume, test_only, restarted):
    """Rank 0, before any work (the dataset scan, the model): the output folder exists, is writable, is not
    in use by another run (its lock is taken here and held for the whole run), and holds no other run's files
    that this run would replace. --test-only writes nothing: it only needs the folder to read from."""
    if test_only:
        return
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output-dir {output_dir}: cannot create ({describe_os_error(e)})") from None
    if not os.access(output_dir, os.W_OK):
        raise UserError(f"--output-dir {output_dir}: not writable")
    refuse_if_busy(output_dir)  # first: a running run's folder is "in use", whatever files it holds
    if not restarted:  # (a job torchrun started again: the folder is this job's own)
        if not resume:
            check_fresh_output_dir(output_dir, overwrite)
        elif resume == "auto" and not resumable_checkpoint_files(output_dir):
            check_fresh_output_dir(output_dir, overwrite, nothing_to_resume=True)
    lock_output_dir(output_dir)  # after the checks: a refused run changes nothing in the folder


class OutputLock:
    """An exclusive lock on --output-dir for the whole run (flock: the kernel drops it when the process
    dies, however it dies, so no stale lock is ever left behind). Take it with lock_output_dir().

    The locked descriptor is read-only (flock needs no write access): no file of the run stays open for
    writing between writes, so an administrator can still remount the folder's file system read-only."""

    def __init__(self, output_dir):
        self.path = os.path.join(output_dir, ".lock")
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"--output-dir {output_dir}: cannot create its lock file .lock "
                            f"({describe_os_error(e)})") from None
        try:
            _flock_or_refuse(self.fd, output_dir)
        except UserError:
            os.close(self.fd)
            raise
        try:
            with open(self.path, "w") as f:  # who holds it, for the message above
                f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        except OSError as e:
            os.close(self.fd)
            raise UserError(f"--output-dir {output_dir}: cannot write its lock file .lock "
                            f"({describe_os_error(e)})") from None

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        for key, lock in list(_held_locks.items()):
            if lock is self:
                del _held_locks[key]


def _flock_or_refuse(fd, output_dir):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        raise UserError(f"--output-dir {output_dir} is in use by another run ({holder}); wait for it to "
                        f"finish or use another --output-dir") from None


def refuse_if_busy(output_dir):
    """One line if another run holds `output_dir`'s lock; creates and changes nothing."""
    if os.path.realpath(output_dir) in _held_locks:
        return  # our own
    try:
        fd = os.open(os.path.join(output_dir, ".lock"), os.O_RDONLY)
    except OSError:
        return  # no lock file: no run holds the folder
    try:
        _flock_or_refuse(fd, output_dir)
    finally:
        os.close(fd)  # and with it the lock just taken


# This process's locks. flock locks belong to an open file: a second OutputLock on the same folder in the same
# process would refuse its own run, so validate_args' lock and the one main() releases are the same object.
_held_locks = {}


def lock_output_dir(output_dir):
    """This process's OutputLock on `output_dir`, taken on the first call and returned on the next ones."""
    key = os.path.realpath(output_dir)
    if key not in _held_locks:
        _held_locks[key] = OutputLock(output_dir)
    return _held_locks[key]


def previous_run_files(output_dir):
    """Our files in `output_dir` that belong to a run: checkpoints and the metrics file."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir)
                  if n in RUN_FILES or (n.startswith("model_") and n.endswith(".pth")))


def check_fresh_output_dir(output_dir, overwrite, nothing_to_resume=False):
    """A fresh run (nothing to resume) must not replace another run's checkpoints or curve: one line, before
    any work starts, unless --overwrite. nothing_to_resume: --resume auto found no checkpoint there."""
    files = previous_run_files(output_dir)
    if files and not overwrite:
        shown = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
        if nothing_to_resume:
            raise UserError(f"--resume auto: --output-dir {output_dir} holds no checkpoint to resume, but another "
                            f"run's files ({shown}) that a fresh start would replace; resume a file with --resume "
                            f"FILE, choose another --output-dir, or pass --overwrite to replace them")
        raise UserError(f"--output-dir {output_dir} holds another run ({shown}); continue it with --resume auto, "
                        f"choose another --output-dir, or pass --overwrite to replace it")


def start_fresh_metrics(output_dir):
    """--overwrite (or --resume auto with nothing to resume): a fresh run starts a fresh curve."""
    metrics = os.path.join(output_dir, "metrics.jsonl")
    try:
        if os.path.exists(metrics):
            os.remove(metrics)
    except OSError as e:
        raise UserError(f"could not remove the previous {metrics}: {describe_os_error(e)}") from None


# ----------------------------------------------------------------------------
# The run's other files: metrics.jsonl and run.json (rank 0)
# ----------------------------------------------------------------------------

def append_metrics(output_dir, record):
    """One JSON object per epoch in <output-dir>/metrics.jsonl (rank 0 only): easy to plot, grep or load.
    A write that fails (a full disk) leaves no half line behind and is one line; the checkpoints are untouched."""
    if not output_dir or not utils.is_main_process():
        return
    path = os.path.join(output_dir, "metrics.jsonl")
    line = (json.dumps(record) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask applies, as to open()
        try:
            size = os.fstat(fd).st_size
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                try:
                    os.ftruncate(fd, size)  # the file stays whole JSON lines
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)
    except OSError as e:
        raise UserError(f"could not write {path}: {describe_os_error(e)}; the checkpoints written so far are "
                        f"intact") from None


def write_run_description(output_dir, description):
    """<output-dir>/run.json (rank 0): what the launchers' summary needs besides metrics.jsonl (world size,
    batch, device, model), as data rather than as words to grep from the log. Replaced atomically."""
    if not output_dir or not utils.is_main_process():
        return
    path = os.path.join(output_dir, "run.json")
    try:
        with _replacing(path) as tmp, open(tmp, "w") as f:
            json.dump(description, f, indent=1)
            f.write("\n")
    except OSError as e:
        raise UserError(f"could not write {path}: {describe_os_error(e)}") from None
