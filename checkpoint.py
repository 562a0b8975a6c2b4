"""Our checkpoints: what they hold (training_state, Position), writing them so that a crash at any moment leaves
a loadable file (replacing, save_atomic, link_atomic, save_checkpoints), finding the one to resume and
resuming from it (ours, the two earlier layouts of this repository, the Ascend original's and torchvision's).
Checkpoints hold only tensors and plain data: weights.load_safe reads them without running code. Every write
failure (a full disk, a folder made read-only or deleted mid-run) is a one-line UserError. (The run folder
around them is rundir.py.)"""
import argparse
import contextlib
import errno
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

import torch

import comm
import utils
from cli import UserError, describe_os_error
from weights import describe_mismatch, load_safe, read_weights, saved_config

# ----------------------------------------------------------------------------
# Reading and writing files
# ----------------------------------------------------------------------------

@contextlib.contextmanager
def replacing(path):
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
    folder, flushed and fsynced, then renamed over the target (replacing)."""
    with replacing(path) as tmp:
        _save_file(obj, tmp)


def _save_file(obj, path):
    """torch.save to a new file, flushed and fsynced."""
    with open(path, "wb") as f:
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
    a missing or partial `path`: link to a temporary name, then rename it over `path` (replacing). Where the
    file system has no hard links, an atomic copy instead (as timm's checkpoint saver does). Returns "link" or
    "copy"."""
    with replacing(path) as tmp:
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


def resumable_checkpoint_files(output_dir):
    """The files --resume auto considers (checkpoint.pth, model_<epoch>.pth and other model_*.pth but the best),
    by name only (find_latest_checkpoint loads them)."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir) if n.endswith(".pth") and n != "model_best.pth"
                  and (n == "checkpoint.pth" or n.startswith("model_")))


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

@dataclass(frozen=True)
class Position:
    """Where training stands, the one record of it in a checkpoint ('position'): `step` steps of `epoch` are
    done (0: the epoch has not started); evaluated=False: epoch - 1 is trained but its evaluation is pending
    (a resumed run evaluates it first). `order`: what the epoch's sample order was drawn from -- the seed, the
    number of training images and a digest of their names -- so that a mid-epoch resume can tell whether the
    rest of that order is the rest of what was trained (see resume)."""
    epoch: int = 0
    step: int = 0
    evaluated: bool = True
    order: dict = None

    def state(self):
        return {"epoch": self.epoch, "step": self.step, "evaluated": self.evaluated, "order": dict(self.order or {})}

    @staticmethod
    def of(ckpt):
        """A checkpoint's Position: ours ('position'), the two earlier layouts of this repository (next_epoch,
        next_step, evaluated: commits dfa5967 and 4cf9c23), or a foreign file's finished 'epoch'."""
        if isinstance(ckpt.get("position"), dict):
            p = ckpt["position"]
            return Position(int(p["epoch"]), int(p.get("step", 0)), bool(p.get("evaluated", True)), p.get("order"))
        if "next_epoch" in ckpt:
            return Position(int(ckpt["next_epoch"]), int(ckpt.get("next_step", 0)),
                            ckpt.get("evaluated", True) is not False)
        return Position(int(ckpt.get("epoch", -1)) + 1)

    def describe(self):
        if self.step:
            return f"from epoch {self.epoch}, step {self.step} (saved mid-epoch)"
        if self.epoch == 0:  # a weights-only file, or one saved before any epoch finished
            return "no finished epoch recorded"
        return f"after epoch {self.epoch - 1}"


def saved_position(path):
    """(epoch, step, evaluated) of the checkpoint at `path`, or (None, None, None) when there is none that loads.
    Memory-mapped: the tensors are not read."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        p = Position.of(ckpt)
        return p.epoch, p.step, p.evaluated
    except Exception:  # missing, partial or foreign: nothing there holds this position
        return None, None, None


def training_state(trainer, args, position, best_acc1, classes, *, pending=None, partial=None, all_ranks=True):
    """Everything a resumed run needs, as tensors and plain data only (loadable with weights_only=True).

    pending: the train metrics of epoch position.epoch - 1 when it is saved before its evaluation. partial: the
    metric sums [loss, correct@1, correct@5, images] of an epoch stopped mid-way, so that its metrics.jsonl row
    counts both attempts. Called on every rank (the RNG states are gathered) unless all_ranks is False (after a
    lost peer: this rank's RNG state only); rank 0's result is written."""
    rng = utils.rng_state(trainer.device)
    state = {
        "model": trainer.model_without_ddp.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "amp": trainer.amp.state_dict(),
        "position": position.state(),
        # The last epoch these weights finished, as torchvision's and the original's checkpoints say it (for
        # their tools; this code reads 'position').
        "epoch": position.epoch - 1 if position.step == 0 else position.epoch,
        "best_acc1": best_acc1,
        "classes": list(classes),
        "args": config_to_dict(args),
        "world_size": comm.get_world_size(),
        "rng": comm.gather_to_main(rng) if all_ranks else [rng],  # one per rank: rank r resumes rng[r]
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


def save_checkpoints(state, output_dir, epoch=None, is_best=False, keep=None, before_commit=None, writer=None):
    """Write `state` as checkpoint.pth and, at an epoch's end, give it its other names. Rank 0 only.

    checkpoint.pth is the commit record, written last: the new file is written under a temporary name, its
    other names are linked to it -- model_best.pth (is_best) and model_<epoch>.pth (`epoch` given, `keep`
    set) -- then before_commit() runs (the epoch's metrics.jsonl row), and only then is it renamed to
    checkpoint.pth. A kill at any moment leaves checkpoint.pth as it was (the epoch "trained, evaluation
    pending"), and the resumed run evaluates the epoch again and redoes every name; never a checkpoint that
    says "evaluated, best" without its model_best.pth. The names are hard links (no space used; copies
    where the file system has none). `keep` N keeps the newest N model_<epoch>.pth up to this epoch ('all':
    every one, torchvision's and the original's behaviour; None: none, and deletes none); the file just
    written is never deleted, nor those of later epochs (left by an attempt that went further). No
    collective. A failed write (a full disk, a folder made read-only or deleted) is one line; the files
    written before are intact. writer: whether this process writes (default: rank 0 only)."""
    if not (comm.is_main_process() if writer is None else writer) or not output_dir:
        return
    latest = os.path.join(output_dir, "checkpoint.pth")
    try:
        with replacing(latest) as new:
            _save_file(state, new)
            if is_best:
                link_atomic(new, os.path.join(output_dir, "model_best.pth"))
            if epoch is not None and keep:
                link_atomic(new, os.path.join(output_dir, f"model_{epoch}.pth"))
            if before_commit is not None:
                before_commit()
        if epoch is not None and keep not in (None, "all"):
            for old in epoch_files(output_dir, up_to=epoch)[:-keep]:
                os.remove(os.path.join(output_dir, f"model_{old}.pth"))
    except OSError as e:
        raise UserError(f"could not write a checkpoint to {output_dir}: {describe_os_error(e)}; the files "
                        f"written before are intact") from None


def epoch_files(output_dir, up_to):
    """The epochs <= up_to that have a model_<epoch>.pth in output_dir, oldest first."""
    epochs = (n[6:-4] for n in os.listdir(output_dir) if n.startswith("model_") and n.endswith(".pth"))
    return sorted(int(e) for e in epochs if e.isdigit() and int(e) <= up_to)


# ----------------------------------------------------------------------------
# Starting from weights: --pretrained and --resume
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Found:
    """A checkpoint to resume or evaluate, as rank 0 read it: its path, model weights and the whole dict."""
    path: str
    state_dict: dict
    ckpt: dict

    @property
    def config(self):
        return saved_config(self.ckpt)


def read_resume_checkpoint(resume, output_dir):
    """The Found checkpoint of --resume (a file, or 'auto': the newest in output_dir), or None.

    Rank 0 finds and reads it and sends it to the other ranks: only rank 0 writes checkpoints, and on other
    machines the ranks may not see its output folder at all. A file that cannot be read is the same one-line
    error on every rank."""
    found, error = None, None
    if comm.is_main_process() and resume:
        try:
            path, ckpt = find_latest_checkpoint(output_dir) if resume == "auto" else (resume, None)
            if path:
                found = Found(path, *read_weights(path, ckpt))
        except UserError as e:
            error = str(e)
    found, error = comm.broadcast_from_main((found, error))
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
    partial: list = None    # metric sums of the first epoch's interrupted attempt (stop.Stopped.partial)
    order_seed: int = None  # the seed of the first epoch's sample order, when it is not this run's --seed


def resume(args, found, trainer, classes, rank, world_size, order=None, log=print):
    """Load a Found checkpoint into the trainer; the ResumePoint to start from. `order`: this run's sample order
    ({'seed', 'images', 'digest'}), against which a checkpoint saved mid-epoch is checked.

    Our checkpoints restore everything. The Ascend original's and torchvision's reference checkpoints
    ({'model', 'optimizer', 'lr_scheduler', 'epoch', 'args'}, and torchvision's 'model_ema') restore the
    weights, the epoch, the momentum buffers and so the schedule's position, and the EMA; what they lack is
    said in one log line each."""
    point = ResumePoint(epoch=args.start_epoch, classes=list(classes))
    if found is None:
        if args.resume == "auto":
            if args.test_only and not args.pretrained:
                raise UserError(f"--test-only --resume auto: no checkpoint in {args.output_dir} to evaluate")
            log(f"--resume auto: no checkpoint in {args.output_dir}, starting fresh")
        return point
    path, ckpt, model = found.path, found.ckpt, trainer.model_without_ddp
    mismatch = describe_mismatch(model, found.state_dict)
    if mismatch:
        raise UserError(f"{path} does not match --model {args.model} with "
                        f"{model.classifier.out_features} classes: {mismatch}")
    _check_classes(ckpt, classes, path, args)
    model.load_state_dict(found.state_dict)
    point.path, point.classes = path, list(ckpt.get("classes") or classes)
    position = Position.of(ckpt)
    if trainer.ema is not None:
        _load_ema(trainer.ema, ckpt, model, path, log)
    if args.test_only:
        log(f"Evaluating {path}: weights {position.describe()}")
        return point
    if "optimizer" in ckpt:
        _load_optimizer_state(trainer.optimizer, ckpt["optimizer"], model, log)
    if "position" in ckpt or "next_epoch" in ckpt:  # ours
        trainer.amp.load_state_dict(ckpt.get("amp"))
        point.epoch, point.step = position.epoch, position.step
        point.best_acc1 = ckpt.get("best_acc1", 0.0)
        point.rng = _this_ranks_rng(ckpt, rank, world_size, log)
        if not position.evaluated and point.epoch > 0:
            point.pending = dict(ckpt.get("train_stats") or {})
        if point.step:
            _continue_epoch(point, position, ckpt, path, args, order, log)
    else:
        point.epoch = position.epoch
        _log_foreign_gaps(ckpt, point.epoch, log)
    log(f"Resumed from {path}: weights {position.describe()}; continuing at epoch {point.epoch}, step {point.step}")
    return point


def _continue_epoch(point, position, ckpt, path, args, order, log):
    """A checkpoint saved mid-epoch: the rest of that epoch is the rest of its sample order, which is exact only
    with the same global batch and the same training images; a changed --seed is made up for by continuing the
    checkpoint's order (later epochs follow --seed)."""
    saved_args = saved_config(ckpt)
    saved_batch = saved_args.get("batch_size", args.batch_size)
    where = f"{path} was saved mid-epoch (epoch {position.epoch}, step {position.step})"
    if saved_batch != args.batch_size and not args.restart_epoch:  # the epoch goes on with the same global batch
        raise UserError(f"{where} with --batch-size {saved_batch}; resume it with the same --batch-size (or pass "
                        f"--restart-epoch to train epoch {position.epoch} again from its start)")
    saved = position.order or {}
    changed = [what for what, key in (("their number", "images"), ("their file names", "digest"))
               if order is not None and saved.get(key) is not None and saved[key] != order[key]]
    if changed and not args.restart_epoch:
        raise UserError(f"{where} with {saved['images']} training images; {args.data_path} has {order['images']} "
                        f"now ({' and '.join(changed)} changed), so the rest of that epoch's order is not the rest "
                        f"of what was trained: resume with the data it was saved with, or pass --restart-epoch to "
                        f"train epoch {position.epoch} again from its start")
    if args.restart_epoch:
        log(f"--restart-epoch: epoch {position.epoch} starts again from its first step (the {position.step} steps "
            f"it had done are trained again)")
        point.step = 0
        return
    point.partial = ckpt.get("partial_epoch")
    seed = saved.get("seed", saved_args.get("seed"))
    if seed is not None and seed != args.seed:
        point.order_seed = seed
        log(f"Note: {path} was trained with --seed {seed}: epoch {position.epoch} goes on in that seed's sample "
            f"order (each image once); later epochs follow --seed {args.seed}")


def _load_ema(ema, ckpt, model, path, log):
    """The EMA from a checkpoint: ours ('model_ema', the bare model's keys) or torchvision's reference
    (ExponentialMovingAverage: 'module.'-prefixed keys and 'n_averaged'). A checkpoint without one (saved
    without --model-ema) starts the EMA from the weights just loaded, not from the random initialisation."""
    saved = ckpt.get("model_ema")
    if not isinstance(saved, dict):
        ema.module.load_state_dict(model.state_dict())
        log("Model EMA: the checkpoint has none (saved without --model-ema): it starts from the loaded weights")
        return
    updates = saved.get("n_averaged")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in saved.items() if k != "n_averaged"}
    mismatch = describe_mismatch(ema.module, state)
    if mismatch:
        raise UserError(f"{path}: its model_ema does not fit this model: {mismatch}")
    ema.module.load_state_dict(state)
    ema.num_updates = int(updates) if updates is not None else ckpt.get("model_ema_updates", 0)


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
