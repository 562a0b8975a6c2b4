"""Train and evaluate DenseNet on an ImageNet-layout folder, on one device or many.

    python main.py --data-path /data/imagenet                      # whatever device is here
    torchrun --nproc_per_node 8 main.py --data-path ... -b 1024    # DDP; -b is the global batch

Reads top to bottom: arguments, then main() (devices, data, model, optimizer,
resume, the epoch loop), then train_one_epoch() and evaluate(). Everything that
differs between Ascend NPU, NVIDIA GPU and CPU is in device.py.
"""
import argparse
import math
import os
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

import data as data_lib
import densenet
import recipe
import utils
from cli import EXIT_USER_ERROR, UserError
from device import DeviceError, build_mixed_precision, build_sgd, resolve_device
from utils import log

EXIT_NUMERICAL_ERROR = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" -- resume with --resume auto

# torchvision's published weights, as they sit in the torch hub cache (nothing is downloaded here).
TORCHVISION_WEIGHT_FILES = {
    "densenet121": "densenet121-a639ec97.pth",
    "densenet161": "densenet161-8d451a50.pth",
    "densenet169": "densenet169-b2777c0a.pth",
    "densenet201": "densenet201-c1103571.pth",
}


def get_args_parser():
    p = argparse.ArgumentParser(description="DenseNet ImageNet training (Ascend NPU / NVIDIA GPU / CPU)")
    a = p.add_argument
    # data
    a("--data-path", "--data_path", dest="data_path", default=None, help="folder with train/<class>/ and val/<class>/")
    a("--synthetic", action="store_true", help="random images instead of a dataset (performance runs)")
    a("-j", "--workers", type=int, default=None, help="data loading workers per process (default: from CPU count)")
    a("--train-crop-size", type=int, default=224)
    a("--val-resize-size", type=int, default=256)
    a("--val-crop-size", type=int, default=224)
    a("--interpolation", default="bilinear", choices=sorted(data_lib.INTERPOLATIONS))
    a("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
      help="area range of RandomResizedCrop (torchvision's default 0.08 1.0)")
    a("--hflip-prob", type=float, default=0.5, help="probability of a horizontal flip in training")
    a("--fast-decode", action=argparse.BooleanOptionalAction, default=True,
      help="training images: crop drawn from the JPEG header, libjpeg-turbo decode (reduced scale when the crop "
           "allows) and torch's uint8 resize, ~2x images/s per core; --no-fast-decode: torchvision's PIL path "
           "(same crops and flips; pixels within 2 levels). Off by itself with --auto-augment or non-bilinear")
    a("--max-bad-images", type=int, default=100, help="stop if more unreadable training images than this")
    # model
    a("--model", default="densenet201", choices=sorted(densenet.MODELS))
    a("--num_classes", "--num-classes", dest="num_classes", type=int, default=None,
      help="default: number of class folders in train/ (1000 for --synthetic)")
    a("--drop-rate", type=float, default=0.0, help="dropout after each dense layer")
    a("--memory-efficient", action="store_true", help="gradient checkpointing in dense layers: less memory, ~20%% slower")
    a("--pretrained", action="store_true", help="start from pretrained weights (see --pretrained_weight_path)")
    a("--pretrained_weight_path", "--pretrained-weight-path", dest="pretrained_weight_path", default=None)
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None,
      help="NHWC memory format (default: on for cuda/cpu, off for npu)")
    a("--compile", action="store_true", help="torch.compile the model (compile time reported separately)")
    # optimisation
    a("--epochs", type=int, default=90)
    a("-b", "--batch-size", type=int, default=128, help="global batch size (divided among ranks)")
    a("--lr", type=float, default=0.1)
    a("--momentum", type=float, default=0.9)
    a("--wd", "--weight-decay", dest="weight_decay", type=float, default=1e-4)
    a("--norm-weight-decay", type=float, default=0.0,
      help="weight decay for BatchNorm weights and all biases (default 0: not decayed)")
    a("--label-smoothing", type=float, default=0.0)
    a("--lr-scheduler", default="step", choices=["step", "cosine", "exponential"])
    a("--lr-step-size", type=int, default=30)
    a("--lr-gamma", type=float, default=0.1)
    a("--lr-min", type=float, default=0.0)
    a("--lr-warmup-epochs", type=float, default=0)
    a("--lr-warmup-method", default="linear", choices=["linear", "constant"])
    a("--lr-warmup-decay", type=float, default=0.01, help="warm-up starts at lr * this")
    a("--clip-grad-norm", type=float, default=None, help="clip the global gradient norm to this value")
    # recipe options (torchvision reference names; see README "Recipes")
    a("--auto-augment", default=None, choices=list(recipe.AUTO_AUGMENT))
    a("--ra-magnitude", type=int, default=9, help="RandAugment magnitude")
    a("--augmix-severity", type=int, default=3)
    a("--random-erase", type=float, default=0.0, help="RandomErasing probability")
    a("--mixup-alpha", type=float, default=0.0)
    a("--cutmix-alpha", type=float, default=0.0)
    a("--model-ema", action="store_true", help="also train, evaluate and checkpoint an EMA of the weights")
    a("--model-ema-steps", type=int, default=32, help="update the EMA every this many steps")
    a("--model-ema-decay", type=float, default=0.99998, help="EMA decay (adjusted for batch and epochs, as torchvision)")
    a("--ra-sampler", action="store_true", help="repeated augmentation sampler")
    a("--ra-reps", type=int, default=3, help="repetitions per image with --ra-sampler")
    # mixed precision
    a("--amp", action="store_true", help="mixed precision (backend/dtype by device, see README)")
    a("--apex", action="store_true", help="the reference's spelling of --amp --amp-backend apex")
    a("--amp-backend", default="auto", choices=["auto", "apex", "native"])
    a("--amp-dtype", default="auto", choices=["auto", "fp16", "bf16"])
    a("--apex-opt-level", default="O2", choices=["O0", "O1", "O2", "O3"])
    a("--loss_scale_value", "--loss-scale-value", dest="loss_scale_value", default=None,
      help="a number (static loss scale) or 'dynamic' (fp16 only; default dynamic)")
    # devices and distribution
    a("--device", default="auto", choices=["auto", "npu", "cuda", "cpu"])
    a("--device_id", "--device-id", dest="device_id", type=int, default=None, help="device index for 1-device runs")
    a("--distributed", action="store_true", help="require a distributed launch (implied under torchrun)")
    a("--world-size", type=int, default=None, help="number of processes (taken from the launcher)")
    a("--dist-url", default="env://")
    a("--dist_rank", "--dist-rank", dest="dist_rank", type=int, default=0, help="node rank (RANK_ID launches)")
    a("--dist-backend", default=None, choices=["hccl", "nccl", "gloo"], help="default: follows the device")
    a("--dist-timeout", type=int, default=600, help="seconds before a stuck collective fails the job")
    a("--device_ids", "--device-ids", dest="device_ids", default=None,
      help="comma-separated devices for local ranks 0,1,..., e.g. 0,1,2,3")
    a("--sync-bn", action="store_true")
    # run control
    a("--output-dir", default=".", help="checkpoints and metrics go here")
    a("--resume", default="", help="checkpoint to resume from, or 'auto' for the latest in --output-dir")
    a("--start-epoch", type=int, default=0)
    a("--test-only", action="store_true")
    a("--print-freq", type=int, default=10)
    a("--log-file", default=None, help="also write this process's output here; {rank} becomes the global rank")
    a("--max-steps", type=int, default=None, help="stop each epoch after this many steps")
    a("--warmup-steps", type=int, default=5, help="steps excluded from the steady-state FPS")
    a("--keep-checkpoints", type=int, default=None, help="keep only the newest K model_<epoch>.pth")
    a("--seed", type=int, default=1234)
    a("--deterministic", action="store_true", help="deterministic algorithms (bit-exact resume on CPU)")
    a("--tensorboard", action="store_true", help="also log the per-epoch metrics to <output-dir>/tensorboard")
    return p


# ----------------------------------------------------------------------------
# Argument validation: everything that can be known before touching data
# ----------------------------------------------------------------------------

def validate_args(args):
    checks = [
        (args.epochs < 0, f"--epochs must be >= 0, got {args.epochs}"),
        (args.batch_size <= 0, f"--batch-size must be > 0, got {args.batch_size}"),
        (args.lr < 0, f"--lr must be >= 0, got {args.lr}"),
        (args.workers is not None and args.workers < 0, f"--workers must be >= 0, got {args.workers}"),
        (args.max_bad_images < 0, f"--max-bad-images must be >= 0, got {args.max_bad_images}"),
        (args.print_freq <= 0, f"--print-freq must be > 0, got {args.print_freq}"),
        (args.max_steps is not None and args.max_steps <= 0, f"--max-steps must be > 0, got {args.max_steps}"),
        (min(args.train_crop_size, args.val_crop_size, args.val_resize_size) <= 0, "image sizes must be > 0"),
        (args.val_crop_size > args.val_resize_size, "--val-crop-size cannot exceed --val-resize-size"),
        (args.num_classes is not None and args.num_classes <= 0, "--num_classes must be > 0"),
        (args.test_only and not (args.resume or args.pretrained),
         "--test-only needs weights: give --resume CHECKPOINT or --pretrained"),
        (not args.synthetic and not args.data_path, "no dataset: pass --data-path /path/to/imagenet (or --synthetic)"),
        (args.keep_checkpoints is not None and args.keep_checkpoints < 1, "--keep-checkpoints must be >= 1"),
        (args.lr_step_size <= 0, "--lr-step-size must be > 0"),
        (args.lr_warmup_epochs < 0, "--lr-warmup-epochs must be >= 0"),
    ]
    for failed, message in checks:
        if failed:
            raise UserError(message)
    launcher_rank = (utils.launcher_env() or (0,))[0]
    if args.resume and args.resume != "auto" and launcher_rank == 0 and not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume}: no such file")  # only rank 0 reads it (and sends it on)
    if args.pretrained_weight_path and not os.path.isfile(args.pretrained_weight_path):
        raise UserError(f"--pretrained_weight_path {args.pretrained_weight_path}: no such file")
    if args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if args.device_ids:
        try:
            args.device_ids = [int(x) for x in str(args.device_ids).split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--device_ids must be comma-separated integers, got {args.device_ids!r}")
    if not args.synthetic:
        args.classes = data_lib.check_dataset_layout(args.data_path)
    if args.output_dir:
        try:
            os.makedirs(args.output_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"--output-dir {args.output_dir}: cannot create ({e.strerror})")
        if not os.access(args.output_dir, os.W_OK):
            raise UserError(f"--output-dir {args.output_dir}: not writable")


def setup_process(args):
    """Work out rank/world size from the launcher and bind this process's device."""
    env = utils.launcher_env()
    if env is not None and env[2] > 1:
        args.rank, args.local_rank, args.world_size = env
        args.distributed = True
    elif args.distributed:
        raise UserError("--distributed needs a launcher: run under torchrun (sets RANK, LOCAL_RANK, WORLD_SIZE) "
                        "or use test/train_full_8p.sh")
    else:
        args.rank, args.local_rank, args.world_size = 0, 0, 1
    device_ids = args.device_ids
    if not args.distributed and args.device_id is not None:
        device_ids = [args.device_id]
    device = resolve_device(args.device, args.local_rank, device_ids)
    if device.type == "cpu" and args.distributed and "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one machine share its cores; oversubscribed OpenMP threads slow CPU training many-fold.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", args.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if args.distributed:
        if args.batch_size % args.world_size:
            raise UserError(f"--batch-size {args.batch_size} is the global batch and must divide evenly "
                            f"among {args.world_size} ranks")
        if args.sync_bn and device.type == "cpu":
            raise UserError("--sync-bn: torch's SyncBatchNorm runs on GPU/NPU only, not on CPU; drop --sync-bn")
        utils.init_distributed(args, device)
    return device


# ----------------------------------------------------------------------------
# Model, optimizer, learning rate
# ----------------------------------------------------------------------------

def load_pretrained(model, args):
    """Load --pretrained_weight_path, else torchvision's file from the hub cache; re-init a classifier that
    does not fit --num_classes. Everything else must match exactly."""
    path = args.pretrained_weight_path
    if not path:
        filename = TORCHVISION_WEIGHT_FILES[args.model]
        path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
        if not os.path.isfile(path):
            raise UserError(f"--pretrained: no weights on disk; download https://download.pytorch.org/models/"
                            f"{filename} to {path} (or pass --pretrained_weight_path FILE)")
    state_dict, _ = utils.read_weights(path)
    own = model.state_dict()
    skipped = [k for k in ("classifier.weight", "classifier.bias")
               if k in state_dict and k in own and state_dict[k].shape != own[k].shape]
    weight_classes = state_dict["classifier.weight"].shape[0] if skipped else None
    for k in skipped:
        del state_dict[k]
    mismatch = utils.describe_mismatch(model, {**state_dict, **{k: own[k] for k in skipped}})
    if mismatch:
        raise UserError(f"{path} does not fit --model {args.model}: {mismatch}")
    model.load_state_dict(state_dict, strict=not skipped)
    log(f"Loaded pretrained weights from {path}")
    if skipped:
        log(f"Classifier re-initialised for {own['classifier.weight'].shape[0]} classes (the weights have "
            f"{weight_classes}); not loaded: {', '.join(skipped)}")


def param_groups(model, weight_decay, norm_weight_decay):
    """Decay conv/linear weights; BatchNorm weights and biases get --norm-weight-decay (0 by default)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": norm_weight_decay}]


def learning_rate(args, epoch_progress):
    """Closed-form LR at a (fractional) epoch: optional warm-up, then step / cosine / exponential decay.

    Computed every step rather than kept in a stateful scheduler, so a run resumed
    mid-epoch lands on exactly the same value.
    """
    warmup = args.lr_warmup_epochs
    if epoch_progress < warmup:
        if args.lr_warmup_method == "constant":
            return args.lr * args.lr_warmup_decay
        return args.lr * (args.lr_warmup_decay + (1 - args.lr_warmup_decay) * epoch_progress / warmup)
    t = epoch_progress - warmup
    if args.lr_scheduler == "step":
        return args.lr * args.lr_gamma ** math.floor(t / args.lr_step_size)
    if args.lr_scheduler == "exponential":
        return args.lr * args.lr_gamma ** math.floor(t)
    total = max(args.epochs - warmup, 1e-8)
    return args.lr_min + (args.lr - args.lr_min) * 0.5 * (1 + math.cos(math.pi * min(t / total, 1.0)))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------
# Preemption and numerical faults
# ----------------------------------------------------------------------------

class Preempted(Exception):
    pass


class NumericalError(RuntimeError):
    pass


class StopSignal:
    """Remember SIGTERM/SIGINT so the trainer can finish its step and checkpoint instead of dying mid-write."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def should_stop(self):
        """True on every rank as soon as any rank was signalled."""
        return utils.any_rank(self.requested)


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------

@dataclass
class Trainer:
    """What one training step needs, bundled so the loop's signature stays short."""
    model: nn.Module              # what runs the step: DDP- and/or torch.compile-wrapped
    model_without_ddp: nn.Module  # what is saved and evaluated
    ema: object
    optimizer: torch.optim.Optimizer
    amp: object
    device: object
    normalize: object
    criterion: nn.Module
    mixup: object


def checkpoint_state(t, args, next_epoch, next_step, best_acc1, classes):
    """Everything a resumed run needs, as tensors and plain data only (loadable with weights_only=True).
    Called on every rank (the RNG states are gathered); only rank 0's result is written."""
    state = {
        "model": t.model_without_ddp.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "lr_scheduler": {"name": args.lr_scheduler, "next_epoch": next_epoch},
        "amp": t.amp.state_dict(),
        "epoch": next_epoch - 1 if next_step == 0 else next_epoch,
        "next_epoch": next_epoch,
        "next_step": next_step,
        "best_acc1": best_acc1,
        "classes": list(classes),
        "args": utils.args_to_dict(args),
        "world_size": utils.get_world_size(),
        "rng": utils.gather_to_main(utils.rng_state(t.device)),  # one per rank: rank r resumes rng[r]
    }
    if t.ema is not None:
        state["model_ema"] = t.ema.state_dict()
        state["model_ema_updates"] = t.ema.num_updates
    return state


def save_checkpoint(state, args, epoch=None, is_best=False):
    """checkpoint.pth always; model_<epoch>.pth at epoch ends; model_best.pth on a new best. Rank 0 only."""
    if not utils.is_main_process() or not args.output_dir:
        return
    try:
        _write_checkpoints(state, args, epoch, is_best)
    except OSError as e:  # e.g. a full disk: the previous files are intact (atomic writes), say so in one line
        raise UserError(f"could not write a checkpoint to {args.output_dir}: {e.strerror or e}; the previous "
                        f"checkpoint is intact")


def _write_checkpoints(state, args, epoch, is_best):
    utils.save_atomic(state, os.path.join(args.output_dir, "checkpoint.pth"))
    if epoch is not None:
        utils.save_atomic(state, os.path.join(args.output_dir, f"model_{epoch}.pth"))
        if args.keep_checkpoints:
            epochs = sorted(int(n[6:-4]) for n in os.listdir(args.output_dir)
                            if n.startswith("model_") and n[6:-4].isdigit())
            for old in epochs[:-args.keep_checkpoints]:
                os.remove(os.path.join(args.output_dir, f"model_{old}.pth"))
    if is_best:
        best = {k: state[k] for k in ("model", "epoch", "best_acc1", "classes", "args")}
        utils.save_atomic(best, os.path.join(args.output_dir, "model_best.pth"))


def read_resume_checkpoint(args):
    """(path, state_dict, checkpoint) to resume from, or (None, None, None).

    Rank 0 finds (--resume auto) and reads the checkpoint and sends it to the other ranks: only rank 0
    writes checkpoints, and on other machines the ranks may not see its output folder at all. A file that
    cannot be read is the same one-line error on every rank."""
    found, error = (None, None, None), None
    if utils.is_main_process() and args.resume:
        try:
            path, checkpoint = (utils.find_latest_checkpoint(args.output_dir) if args.resume == "auto"
                                else (args.resume, None))
            if path:
                found = (path, *utils.read_weights(path, checkpoint))
        except UserError as e:
            error = str(e)
    found, error = utils.broadcast_from_main((found, error))
    if error:
        raise UserError(error)
    return found


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------

def main(args):
    if not args.resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        # torchrun --max-restarts restarted this job after a failure: continue from the last checkpoint.
        args.resume = "auto"
    validate_args(args)
    device = setup_process(args)
    amp = build_mixed_precision(args, device)  # before any data is read: a missing apex fails fast
    stop = StopSignal()
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    utils.seed_everything(args.seed + args.rank)
    world = args.world_size
    local_batch = args.batch_size // world
    workers = data_lib.default_workers(world) if args.workers is None else args.workers
    channels_last = args.channels_last if args.channels_last is not None else device.type in ("cuda", "cpu")
    log(f"Device: {device.describe()}; world size {world}; "
        + (f"global batch {args.batch_size} = {world} x {local_batch}" if args.distributed
           else f"batch {args.batch_size}") + f"; workers {workers} per process")

    # -- data ----------------------------------------------------------------
    if args.synthetic:
        classes = [str(i) for i in range(args.num_classes or 1000)]
        steps = args.max_steps or 100
        train_loader = data_lib.SyntheticLoader(local_batch, args.train_crop_size, len(classes), steps, args.seed)
        val_loader = None
    else:
        classes = args.classes
        train_set = data_lib.ImageFolderDataset(os.path.join(args.data_path, "train"),
                                                data_lib.train_transform(
                                                    args.train_crop_size, args.interpolation, args.crop_scale,
                                                    args.hflip_prob, args.auto_augment, args.ra_magnitude,
                                                    args.augmix_severity, args.random_erase,
                                                    fast_decode=args.fast_decode),
                                                seed=args.seed)
        val_set = data_lib.ImageFolderDataset(os.path.join(args.data_path, "val"),
                                              data_lib.eval_transform(args.val_resize_size, args.val_crop_size,
                                                                      args.interpolation), seed=args.seed)
        train_sampler = data_lib.ResumableDistributedSampler(len(train_set), world, args.rank, args.seed,
                                                             repeats=args.ra_reps if args.ra_sampler else 1)
        val_sampler = data_lib.ExactEvalSampler(len(val_set), world, args.rank)
        pin = device.is_accelerator
        train_loader = data_lib.make_loader(train_set, train_sampler, local_batch, workers, pin, args.seed)
        val_loader = data_lib.make_loader(val_set, val_sampler, local_batch, workers, pin, args.seed)
        log(f"Data: {len(train_set)} train / {len(val_set)} val images, {len(classes)} classes from {args.data_path}")
    num_classes = args.num_classes or len(classes)
    normalize = data_lib.DeviceNormalize(device.torch_device, channels_last)

    # -- model ---------------------------------------------------------------
    model = densenet.build_model(args.model, num_classes=num_classes, drop_rate=args.drop_rate,
                                 memory_efficient=args.memory_efficient)
    if args.pretrained:
        load_pretrained(model, args)
    model.to(device.torch_device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_sgd(param_groups(model, args.weight_decay, args.norm_weight_decay), args.lr,
                          args.momentum, device, use_apex=amp.backend == "apex")
    model, optimizer = amp.initialize(model, optimizer)
    log(f"Model: {args.model}, {num_classes} classes, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"parameters; {'channels_last' if channels_last else 'NCHW'}; precision: {amp.describe()}")
    if args.amp and amp.backend == "native" and args.loss_scale_value not in (None, "dynamic") and amp.scaler is None:
        log(f"Note: --loss_scale_value {args.loss_scale_value} ignored: bf16 needs no loss scaling")
    if args.amp and device.type != "npu" and amp.backend == "native":
        log("Note: apex AMP is used on Ascend NPUs only; on this device --amp uses native torch.amp")
    model_without_ddp = model
    ema = None
    if args.model_ema:
        decay = recipe.ema_decay_for_run(args.model_ema_decay, world, local_batch, args.model_ema_steps, args.epochs)
        ema = recipe.ModelEma(model_without_ddp, decay)
        log(f"Model EMA: decay {decay:.6f} every {args.model_ema_steps} steps (from --model-ema-decay "
            f"{args.model_ema_decay} adjusted for this batch and length)")
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.is_accelerator else None)
    t = Trainer(model=torch.compile(model) if args.compile else model, model_without_ddp=model_without_ddp,
                ema=ema, optimizer=optimizer, amp=amp, device=device, normalize=normalize,
                criterion=nn.CrossEntropyLoss(label_smoothing=args.label_smoothing),
                mixup=recipe.MixupCutmix(num_classes, args.mixup_alpha, args.cutmix_alpha))

    # -- resume --------------------------------------------------------------
    start_epoch, start_step, best_acc1 = args.start_epoch, 0, 0.0
    resume_path, state_dict, ckpt = read_resume_checkpoint(args)
    if args.resume == "auto" and not resume_path:
        if args.test_only and not args.pretrained:
            raise UserError(f"--test-only --resume auto: no checkpoint in {args.output_dir} to evaluate")
        log(f"--resume auto: no checkpoint in {args.output_dir}, starting fresh")
    rng_to_restore = None
    if resume_path:
        mismatch = utils.describe_mismatch(model_without_ddp, state_dict)
        if mismatch:
            raise UserError(f"{resume_path} does not match --model {args.model} with {num_classes} classes: {mismatch}")
        model_without_ddp.load_state_dict(state_dict)
        if ema is not None and "model_ema" in ckpt:
            ema.load_state_dict(ckpt["model_ema"])
            ema.num_updates = ckpt.get("model_ema_updates", 0)
        if not args.test_only and "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
            amp.load_state_dict(ckpt.get("amp"))
            start_epoch = ckpt.get("next_epoch", ckpt.get("epoch", -1) + 1)
            start_step = ckpt.get("next_step", 0)
            best_acc1 = ckpt.get("best_acc1", 0.0)
            if ckpt.get("world_size", world) == world and ckpt.get("rng"):
                rng = ckpt["rng"]
                rng_to_restore = rng[args.rank] if isinstance(rng, list) else rng  # a dict: 1-rank, older runs
            elif start_step:
                raise UserError(f"{resume_path} was saved mid-epoch by {ckpt['world_size']} ranks; resume it with "
                                f"the same number of ranks (or from an epoch-end model_<epoch>.pth)")
            saved_batch = (ckpt.get("args") or {}).get("batch_size", args.batch_size)
            if start_step and saved_batch != args.batch_size:  # the sampler skips next_step * batch samples
                raise UserError(f"{resume_path} was saved mid-epoch (step {start_step}) with --batch-size "
                                f"{saved_batch}; resume it with the same --batch-size (or from an epoch-end "
                                f"model_<epoch>.pth)")
        ckpt_classes = list(ckpt.get("classes") or [])
        if ckpt_classes and not args.synthetic and ckpt_classes != list(classes):
            # Output i means ckpt_classes[i]; the loader would label class folder i instead: silently wrong.
            differ = sorted(set(ckpt_classes) ^ set(classes))[:4] or "same names, other order"
            raise UserError(f"{resume_path} was trained on other classes than {args.data_path} (differ: {differ}); "
                            f"use the same dataset, or start from it with --pretrained_weight_path")
        classes = ckpt_classes or classes
        log(f"Resumed from {resume_path}: epoch {start_epoch}, step {start_step}")

    if args.test_only:
        if val_loader is None:
            raise UserError("--test-only needs a dataset (not --synthetic)")
        evaluate(model_without_ddp, val_loader, t, args)
        if ema is not None:
            evaluate(ema.module, val_loader, t, args, log_prefix="EMA ")
        return 0

    # -- train ---------------------------------------------------------------
    history, best_epoch = [], None
    if utils.is_main_process():
        utils.remove_stale_temp_files(args.output_dir)
    if not resume_path and utils.is_main_process() and os.path.exists(os.path.join(args.output_dir, "metrics.jsonl")):
        os.remove(os.path.join(args.output_dir, "metrics.jsonl"))  # a fresh run starts a fresh curve
    log(f"Start training: epochs {start_epoch}..{args.epochs - 1}, lr {args.lr} ({args.lr_scheduler})")
    run_start = time.time()
    tensorboard = utils.TensorBoardLogger(args.output_dir) if args.tensorboard and utils.is_main_process() else None
    for epoch in range(start_epoch, args.epochs):
        if train_loader.sampler is not None:
            train_loader.sampler.set_epoch(epoch, start_step * local_batch)
        if rng_to_restore is not None:
            utils.set_rng_state(rng_to_restore, device)  # continue the random streams exactly where they were
            rng_to_restore = None
        try:
            train_stats = train_one_epoch(t, train_loader, epoch, start_step, args, stop)
        except Preempted:
            steps_done = stop.steps_done
            save_checkpoint(checkpoint_state(t, args, epoch, steps_done, best_acc1, classes), args)
            log(f"Preempted by {stop.signal_name or 'a signal'} at epoch {epoch} step {steps_done}: checkpoint "
                f"saved to {os.path.join(args.output_dir, 'checkpoint.pth')}; resume with --resume auto")
            return EXIT_PREEMPTED
        start_step = 0
        val_stats = evaluate(model_without_ddp, val_loader, t, args) if val_loader else {}
        if ema is not None and val_loader:
            val_stats.update({f"ema_{k}": v for k, v in evaluate(ema.module, val_loader, t, args, "EMA ").items()})
        acc1 = val_stats.get("acc1", 0.0)
        is_best = acc1 > best_acc1
        if is_best:
            best_acc1, best_epoch = acc1, epoch
        save_checkpoint(checkpoint_state(t, args, epoch + 1, 0, best_acc1, classes), args, epoch=epoch, is_best=is_best)
        history.append({"epoch": epoch, **train_stats, **{f"val_{k}": v for k, v in val_stats.items()}})
        utils.append_metrics(args.output_dir, history[-1])
        if tensorboard:
            tensorboard.log(history[-1])
        epochs_left = args.epochs - epoch - 1
        if epochs_left and stop.should_stop():  # signalled during evaluation: the epoch is saved, stop here
            log(f"Preempted by {stop.signal_name or 'a signal'} after epoch {epoch}: checkpoint saved; "
                f"resume with --resume auto")
            return EXIT_PREEMPTED
        if epochs_left:
            per_epoch = (time.time() - run_start) / len(history)  # training and evaluation
            log(f"Epoch: [{epoch}] run eta: {utils.format_eta(per_epoch * epochs_left)} "
                f"({epochs_left} epochs left, evaluation included)")
    if tensorboard:
        tensorboard.close()
    print_run_summary(history, best_acc1, best_epoch, time.time() - run_start)
    return 0


def print_run_summary(history, best_acc1, best_epoch, total_seconds):
    fps = [h["fps"] for h in history if h.get("fps")]
    log("Run summary")
    log(f"  epochs trained : {len(history)}")
    log(f"  best Acc@1     : {best_acc1:.3f}" + (f" (epoch {best_epoch})" if best_epoch is not None else ""))
    log(f"  total time     : {utils.format_eta(total_seconds)}")
    log(f"  mean FPS       : {sum(fps) / len(fps):.2f} img/s" if fps else "  mean FPS       : n/a")


# ----------------------------------------------------------------------------
# One epoch of training
# ----------------------------------------------------------------------------

def train_one_epoch(t, loader, epoch, start_step, args, stop):
    t.model.train()
    dev = t.device.torch_device
    steps_per_epoch = len(loader) + start_step
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    # With --compile the first step is compilation: never inside the FPS window, even with --warmup-steps 0.
    throughput = utils.Throughput(t.device, warmup=max(args.warmup_steps, 1) if args.compile else args.warmup_steps)
    # Running sums stay on the device; they are read (one sync) only every --print-freq steps.
    sums = torch.zeros(4, dtype=torch.float64, device=dev)  # loss*n, correct@1, correct@5, n
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=dev)
    bad_files = []
    window_start, window_images = time.perf_counter(), 0
    epoch_start = time.perf_counter()
    last_loss = torch.zeros((), device=dev)
    stop.steps_done = start_step
    for step, batch in enumerate(loader, start=start_step):
        if step >= steps_per_epoch:
            break
        if batch.bad:
            report_bad_files(batch.bad, bad_files, args)
        n = len(batch.targets)
        if utils.is_dist() and utils.any_rank(n == 0):
            # DDP's gradient all-reduce pairs up across ranks: if a rank's whole local batch was unreadable,
            # all ranks skip the step together (else they fall out of step and hang until --dist-timeout).
            n = 0
        if n:
            images = t.normalize(batch.images)
            targets = batch.targets.to(dev, non_blocking=True)
            loss_targets = targets
            if t.mixup.enabled:
                images, loss_targets = t.mixup(images, targets)
            set_lr(t.optimizer, learning_rate(args, epoch + step / steps_per_epoch))
            with t.amp.autocast():
                output = t.model(images)
                loss = t.criterion(output, loss_targets)
            # Record the first step with a non-finite loss without a host sync; checked at print time.
            bad_now = ~torch.isfinite(loss.detach())
            first_bad_step.copy_(torch.where(bad_now & (first_bad_step < 0), step, first_bad_step))
            t.optimizer.zero_grad(set_to_none=True)
            t.amp.backward_and_step(loss, t.optimizer, t.model.parameters(), args.clip_grad_norm)
            if t.ema is not None and (step + 1) % args.model_ema_steps == 0:
                t.ema.update(t.model_without_ddp)
            last_loss = loss.detach()
            counts = utils.accuracy_counts(output.detach(), targets)
            sums += torch.stack([last_loss.double() * n, counts[0].double(), counts[1].double(),
                                 torch.full((), n, dtype=torch.float64, device=dev)])  # no H2D copy/sync
        if args.compile and step == start_step:
            t.device.synchronize()
            log(f"Epoch: [{epoch}] first step took {time.perf_counter() - epoch_start:.1f} s (torch.compile "
                f"compilation; excluded from FPS)")
        throughput.step(n)
        window_images += n
        stop.steps_done = step + 1
        if (step + 1) % args.print_freq == 0 or step + 1 == steps_per_epoch:
            check_finite(first_bad_step, epoch)
            t.device.synchronize()
            now = time.perf_counter()
            loss_sum, c1, c5, seen = sums.tolist()
            eta = (now - epoch_start) / (step + 1 - start_step) * (steps_per_epoch - step - 1)
            log(f"Epoch: [{epoch}]  [{step + 1:>{len(str(steps_per_epoch))}}/{steps_per_epoch}]  "
                f"eta: {utils.format_eta(eta)}  lr: {t.optimizer.param_groups[0]['lr']:.6f}  "
                f"img/s: {window_images * utils.get_world_size() / (now - window_start):.1f}  "
                f"loss: {float(last_loss):.4f} ({loss_sum / max(seen, 1):.4f})  "
                f"acc1: {100 * c1 / max(seen, 1):.3f}  acc5: {100 * c5 / max(seen, 1):.3f}"
                + (f"  skipped: {int(t.amp.skipped_steps)}" if t.amp.scaler is not None else ""))
            window_start, window_images = now, 0
        if stop.should_stop():
            check_finite(first_bad_step, epoch)
            raise Preempted()
    check_finite(first_bad_step, epoch)
    fps = report_throughput(throughput, epoch, args)
    elapsed = time.perf_counter() - epoch_start
    loss_sum, c1, c5, seen = utils.all_reduce_sum(sums.tolist(), dev)
    n_bad = int(utils.all_reduce_sum([len(bad_files)], dev)[0])
    log(f"Epoch: [{epoch}] done in {utils.format_eta(elapsed)}: train loss {loss_sum / max(seen, 1):.4f}  "
        f"acc1 {100 * c1 / max(seen, 1):.3f}  images {int(seen)}  unreadable images {n_bad}")
    if t.amp.scaler is not None and int(t.amp.skipped_steps):
        log(f"Epoch: [{epoch}] {int(t.amp.skipped_steps)} steps skipped so far for fp16 gradient overflow "
            f"(loss scale now {t.amp.current_scale():g})")
    return {"lr": t.optimizer.param_groups[0]["lr"], "train_loss": loss_sum / max(seen, 1),
            "train_acc1": 100 * c1 / max(seen, 1), "train_acc5": 100 * c5 / max(seen, 1),
            "fps": fps, "epoch_time": elapsed, "images": int(seen), "unreadable_images": n_bad}


def report_throughput(throughput, epoch, args):
    """Log and return the epoch's global steady-state img/s: all ranks' images over the slowest rank's window."""
    if throughput.finish() is None:
        log(f"Epoch: [{epoch}] FPS: n/a (fewer than {args.warmup_steps + 1} steps; lower --warmup-steps)")
        return None
    window = throughput.end - throughput.start
    images_all = utils.all_reduce_sum([throughput.images], throughput.device.torch_device)[0]
    if utils.is_dist():
        t = torch.tensor([window], dtype=torch.float64, device=throughput.device.torch_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        window = t.item()
    fps = images_all / window
    log(f"Epoch: [{epoch}] FPS: {fps:.2f} img/s (steady state: steps {throughput.first_step}-{throughput.steps} "
        f"of {throughput.steps}, {int(images_all)} images in {window:.2f} s, all ranks, data loading "
        f"{'excluded (synthetic)' if args.synthetic else 'included'})")
    return fps


def report_bad_files(bad, seen_so_far, args):
    for path, reason in bad:
        print(f"WARNING: skipped unreadable image {path} ({reason})", file=sys.stderr, flush=True)
    seen_so_far.extend(bad)
    if len(seen_so_far) > args.max_bad_images:
        raise UserError(f"more than --max-bad-images {args.max_bad_images} unreadable training images "
                        f"(latest: {bad[-1][0]}); fix the dataset or raise the limit")


def check_finite(first_bad_step, epoch):
    step = int(first_bad_step)
    if step >= 0:
        # step + 1: counted from 1, like the log's [step/N] lines (and "Preempted ... at epoch e step s").
        raise NumericalError(f"non-finite loss at epoch {epoch} step {step + 1}; stopped without overwriting the "
                             f"last good checkpoint (try a lower --lr, --clip-grad-norm, or fp32)")


# ----------------------------------------------------------------------------
# Evaluation: exact over the whole validation set
# ----------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, loader, t, args, log_prefix=""):
    """Loss, Acc@1 and Acc@5 over the whole validation set: every image counted once, summed over ranks."""
    model.eval()
    dev = t.device.torch_device
    sums = torch.zeros(4, dtype=torch.float64, device=dev)  # loss*n, correct@1, correct@5, n
    criterion = nn.CrossEntropyLoss(reduction="sum")
    n_bad = 0
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        if batch.bad:
            for path, reason in batch.bad:
                print(f"WARNING: skipped unreadable validation image {path} ({reason})", file=sys.stderr, flush=True)
            n_bad += len(batch.bad)
        if not len(batch.targets):
            continue
        images = t.normalize(batch.images)
        targets = batch.targets.to(dev, non_blocking=True)
        with t.amp.autocast():
            output = model(images)
        counts = utils.accuracy_counts(output, targets)
        sums += torch.stack([criterion(output.float(), targets).double(), counts[0].double(), counts[1].double(),
                             torch.full((), len(targets), dtype=torch.float64, device=dev)])
        if (step + 1) % args.print_freq == 0:
            log(f"Test: {log_prefix}[{step + 1}/{len(loader)}]")
    loss_sum, c1, c5, n = utils.all_reduce_sum(sums.tolist(), dev)
    n_bad = int(utils.all_reduce_sum([n_bad], dev)[0])
    acc1, acc5 = 100 * c1 / max(n, 1), 100 * c5 / max(n, 1)
    log(f"Test: {log_prefix}loss {loss_sum / max(n, 1):.4f}, {int(n)} images in {time.perf_counter() - start:.1f} s")
    log(f" * {log_prefix}Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} ({int(n)} images"
        + (f", {n_bad} unreadable skipped)" if n_bad else ")"))
    return {"acc1": acc1, "acc5": acc5, "loss": loss_sum / max(n, 1), "images": int(n),
            "time": time.perf_counter() - start}


# ----------------------------------------------------------------------------

def run(argv=None):
    """Entry point: known failures become one line on stderr and a meaningful exit code."""
    args = get_args_parser().parse_args(argv)
    if args.log_file:
        env = utils.launcher_env()
        path = args.log_file.replace("{rank}", str(env[0] if env else 0))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        utils.tee_stdout_to(path)
    code = 0
    try:
        code = main(args)
    except (UserError, data_lib.DataError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = EXIT_USER_ERROR
    except NumericalError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = EXIT_NUMERICAL_ERROR
    except Exception:
        if not utils.is_dist():
            raise  # a bug or an unexpected failure: keep the full traceback
        traceback.print_exc()
        code = 1
    finally:
        if utils.is_dist():
            if code:  # a failing rank must not leave its peers waiting in a collective: torchrun stops them
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            utils.cleanup_distributed()
    return code


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    sys.exit(run())
