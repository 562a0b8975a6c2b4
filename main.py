"""Train and evaluate DenseNet on an ImageNet-layout folder, on one device or many.

    python main.py --data-path /data/imagenet                      # whatever device is here
    torchrun --nproc_per_node 8 main.py --data-path ... -b 1024    # DDP; -b is the global batch

Reads top to bottom: the arguments, main() (set-up, data, trainer, resume, then evaluation or the epoch
loop), then train_one_epoch() and evaluate() with what they use. The training step itself is
trainer.Trainer.step; checkpoints are checkpoint.py; everything that differs between Ascend NPU, NVIDIA
GPU and CPU is device.py.
"""
import argparse
import functools
import hashlib
import math
import os
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

import cli
cli.check_torchvision()  # before `import data`: a torchvision built for another torch is one line, not a traceback

import checkpoint
import data as data_lib
import densenet
import device as device_lib
import lifecycle
import utils
from cli import EXIT_PREEMPTED, NumericalError, UserError, run_tool
from trainer import build_trainer, learning_rate
from utils import log, warn

EXIT_FAILED = 1  # stopped by a failure the trainer survived (a lost peer, a dead loader): checkpoint saved


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default; one that the help text already explains ("default: the cores ...") is not followed
    by a misleading "(default: None)"."""

    def _get_help_string(self, action):
        if "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def get_args_parser():
    p = cli.ArgumentParser(description="DenseNet ImageNet training (Ascend NPU / NVIDIA GPU / CPU)",
                           formatter_class=HelpFormatter)  # one-line errors, no abbreviations
    g = p.add_argument_group("data").add_argument
    g("--data-path", "--data_path", dest="data_path", default=None, help="folder with train/<class>/ and val/<class>/")
    g("--synthetic", action="store_true", help="random images instead of a dataset (performance runs)")
    g("-j", "--workers", type=int, default=None,
      help="data loading processes per machine, divided among its ranks as the original does (default: the "
           "cores each rank may use, minus one)")
    g("--train-crop-size", type=int, default=224, help="training crop (RandomResizedCrop) size")
    g("--val-resize-size", type=int, default=256, help="validation resize (shorter side)")
    g("--val-crop-size", type=int, default=224, help="validation centre crop")
    g("--interpolation", default="bilinear", choices=sorted(data_lib.INTERPOLATIONS), help="resize filter")
    g("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
      help="area range of RandomResizedCrop")
    g("--hflip-prob", type=float, default=0.5, help="probability of a horizontal flip in training")
    g("--fast-decode", action=argparse.BooleanOptionalAction, default=True,
      help="training JPEGs: crop drawn from the header, libjpeg-turbo decode and torch's uint8 resize, ~2x "
           "images/s per core; --no-fast-decode: torchvision's PIL path (same crops and flips; pixels within 2 "
           "levels). Off by itself with --auto-augment or non-bilinear")
    g("--max-bad-images", type=int, default=100, help="stop if more unreadable training images than this")
    g("--cache-dataset", action="store_true",
      help="accepted for the original's scripts; a no-op here (the file list is scanned at start, in seconds)")
    g = p.add_argument_group("model").add_argument
    g("--model", default="densenet201", choices=sorted(densenet.MODELS), help="architecture")
    g("--num_classes", "--num-classes", dest="num_classes", type=int, default=None,
      help="classifier outputs (default: the number of class folders in train/; 1000 for --synthetic)")
    g("--drop-rate", type=float, default=0.0, help="dropout after each dense layer")
    g("--memory-efficient", action="store_true", help="gradient checkpointing in dense layers: less memory, slower")
    g("--pretrained", action="store_true", help="start from pretrained weights (see --pretrained_weight_path)")
    g("--pretrained_weight_path", "--pretrained-weight-path", dest="pretrained_weight_path", default=None,
      help="weights file for --pretrained (default: torchvision's file in the torch hub cache)")
    g("--channels-last", action=argparse.BooleanOptionalAction, default=None,
      help="NHWC memory format (default: on for cuda/cpu, off for npu)")
    g("--compile", action="store_true", help="torch.compile the model (compile time reported separately)")
    g = p.add_argument_group("optimisation").add_argument
    g("--epochs", type=int, default=90, help="epochs to train")
    g("-b", "--batch-size", type=int, default=128, help="global batch size (divided among ranks)")
    g("--lr", type=float, default=0.1, help="base learning rate")
    g("--momentum", type=float, default=0.9, help="SGD momentum")
    g("--wd", "--weight-decay", dest="weight_decay", type=float, default=1e-4, help="weight decay of conv/linear weights")
    g("--norm-weight-decay", type=float, default=0.0,
      help="weight decay of BatchNorm weights and all biases (the reference recipe: as --wd)")
    g("--label-smoothing", type=float, default=0.0, help="label smoothing of the cross-entropy loss")
    g("--lr-scheduler", default="step", choices=["step", "cosine", "exponential"], help="learning-rate decay")
    g("--lr-update", default="step", choices=["step", "epoch"],
      help="recompute the learning rate every step, or once per epoch (as a scheduler stepped per epoch)")
    g("--lr-step-size", type=int, default=30, help="epochs between step decays")
    g("--lr-gamma", type=float, default=0.1, help="step/exponential decay factor")
    g("--lr-min", type=float, default=0.0, help="cosine's final learning rate")
    g("--lr-warmup-epochs", type=float, default=0, help="linear or constant warm-up length")
    g("--lr-warmup-method", default="linear", choices=["linear", "constant"], help="warm-up shape")
    g("--lr-warmup-decay", type=float, default=0.01, help="warm-up starts at lr * this")
    g("--clip-grad-norm", type=float, default=None, help="clip the global gradient norm to this value")
    g = p.add_argument_group("recipe options (torchvision reference names; README: Recipes)").add_argument
    g("--auto-augment", default=None, choices=list(data_lib.AUTO_AUGMENT), help="automatic augmentation policy")
    g("--ra-magnitude", type=int, default=9, help="RandAugment magnitude")
    g("--augmix-severity", type=int, default=3, help="AugMix severity")
    g("--random-erase", type=float, default=0.0, help="RandomErasing probability")
    g("--mixup-alpha", type=float, default=0.0, help="mixup's Beta(alpha, alpha); 0: off")
    g("--cutmix-alpha", type=float, default=0.0, help="cutmix's Beta(alpha, alpha); 0: off")
    g("--model-ema", action="store_true", help="also train, evaluate and checkpoint an EMA of the weights")
    g("--model-ema-steps", type=int, default=32, help="update the EMA every this many steps")
    g("--model-ema-decay", type=float, default=0.99998, help="EMA decay (adjusted for batch and epochs, as torchvision)")
    g("--ra-sampler", action="store_true", help="repeated augmentation sampler")
    g("--ra-reps", type=int, default=3, help="repetitions per image with --ra-sampler")
    g = p.add_argument_group("mixed precision (README: Mixed precision and devices)").add_argument
    g("--amp", action="store_true", help="mixed precision (backend and dtype by device)")
    g("--apex", action="store_true", help="the original's spelling of --amp --amp-backend apex")
    g("--amp-backend", default="auto", choices=["auto", "apex", "native"], help="auto: apex on NPUs where installed")
    g("--amp-dtype", default="auto", choices=["auto", "fp16", "bf16"], help="native AMP dtype")
    g("--apex-opt-level", default=None, choices=["O0", "O1", "O2", "O3"],
      help=f"apex opt level (default {device_lib.DEFAULT_OPT_LEVEL}, as the original; the launchers pass O2)")
    g("--loss_scale_value", "--loss-scale-value", dest="loss_scale_value", default=None,
      help=f"fp16 loss scale: a number (static) or 'dynamic' (default {device_lib.DEFAULT_LOSS_SCALE:g}, static, "
           f"as the original)")
    g = p.add_argument_group("devices and distribution (torchrun, or the original's RANK_ID/RANK_SIZE)").add_argument
    g("--device", default="auto", choices=device_lib.DEVICE_TYPES, help="auto: npu, else cuda, else cpu")
    g("--device_id", "--device-id", dest="device_id", type=int, default=None, help="device index for 1-device runs")
    g("--distributed", action="store_true",
      help="join the original's RANK_ID/RANK_SIZE launch (implied under torchrun)")
    g("--world-size", type=int, default=1, help="number of machines, for RANK_ID/RANK_SIZE launches (as the original)")
    g("--dist_rank", "--dist-rank", dest="dist_rank", type=int, default=0,
      help="this machine's index, for RANK_ID/RANK_SIZE launches (as the original)")
    g("--dist-url", default="env://", help="rendezvous (env://: MASTER_ADDR/MASTER_PORT; RANK_ID launches without "
                                            "them use the original's 127.0.0.1:29688)")
    g("--dist-backend", default=None, choices=["hccl", "nccl", "gloo"], help="default: follows the device")
    g("--dist-timeout", type=int, default=600, help="seconds before a missing peer or a stuck collective fails the job")
    g("--device_ids", "--device-ids", dest="device_ids", default=None,
      help="comma-separated devices for local ranks 0,1,..., e.g. 4,5,6,7")
    g("--sync-bn", action="store_true", help="SyncBatchNorm across ranks (GPU/NPU)")
    g = p.add_argument_group("run control").add_argument
    g("--output-dir", default=None,
      help="checkpoints, metrics.jsonl and run.json go here (default: a new folder per run, "
           "output/train/<YYYYmmdd-HHMMSS>-<model>)")
    g("--resume", default="", help="checkpoint to resume from, or 'auto' for the newest in --output-dir (without "
                                   "--output-dir: in the newest run of --model under output/train)")
    g("--overwrite", action="store_true", help="start fresh in an --output-dir that holds another run's files")
    g("--start-epoch", type=int, default=0, help="first epoch of a fresh run")
    g("--test-only", action="store_true", help="evaluate the --resume/--pretrained weights and stop")
    g("--print-freq", type=int, default=10, help="log a step line every this many steps (and the first)")
    g("--log-file", default=None, help="also write this process's output here; {rank} becomes the global rank")
    g("--data-timeout", type=float, default=600,
      help="stop with an error when the data loader delivers no batch for this many seconds (0: wait forever)")
    g("--max-steps", type=int, default=None, help="stop each epoch after this many steps")
    g("--warmup-steps", type=int, default=5, help="steps excluded from the steady-state FPS")
    g("--keep-checkpoints", type=checkpoint.keep_checkpoints_arg, default=None, metavar="N|all",
      help="also keep model_<epoch>.pth of the newest N epochs, or of 'all' (torchvision's and the original's "
           "behaviour); hard links, so the latest costs no space (default: none, only checkpoint.pth and "
           "model_best.pth)")
    g("--seed", type=int, default=1234, help="random seed (each rank adds its rank)")
    g("--deterministic", action="store_true", help="deterministic algorithms (bit-exact resume on CPU)")
    g("--tensorboard", action="store_true", help="also log the per-epoch metrics to <output-dir>/tensorboard")
    return p


def launch_of(args):
    """This process's place in its job, from the launcher's environment (utils.launcher_env) and the original's
    --distributed/--dist_rank/--world-size."""
    return utils.launcher_env(args.distributed, args.dist_rank, args.world_size)


def validate_args(args, launch=None):
    """Everything that can be known before any work starts: one line and exit code 2 on the first problem."""
    finite = math.isfinite
    # DenseNet halves the image 5 times (stride-2 stem conv and max-pool, three 2x2 average pools): 29 px is the
    # smallest input that still leaves a 1x1 feature map (all four depths; test_first_contact measures it).
    smallest_image = 29
    checks = [
        (args.epochs < 0, f"--epochs must be >= 0, got {args.epochs}"),
        (args.batch_size <= 0, f"--batch-size must be > 0, got {args.batch_size}"),
        (not (finite(args.lr) and args.lr >= 0), f"--lr must be a finite number >= 0, got {args.lr}"),
        (not (finite(args.momentum) and 0 <= args.momentum <= 1), f"--momentum must be in [0, 1], got {args.momentum}"),
        (not (finite(args.weight_decay) and args.weight_decay >= 0), f"--wd must be >= 0, got {args.weight_decay}"),
        (not (finite(args.norm_weight_decay) and args.norm_weight_decay >= 0),
         f"--norm-weight-decay must be >= 0, got {args.norm_weight_decay}"),
        (not 0 <= args.drop_rate < 1, f"--drop-rate must be in [0, 1), got {args.drop_rate}"),
        (not 0 <= args.label_smoothing <= 1, f"--label-smoothing must be in [0, 1], got {args.label_smoothing}"),
        (not 0 <= args.random_erase <= 1, f"--random-erase must be in [0, 1], got {args.random_erase}"),
        (not 0 <= args.hflip_prob <= 1, f"--hflip-prob must be in [0, 1], got {args.hflip_prob}"),
        (not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1, "--crop-scale needs 0 < MIN <= MAX <= 1"),
        (min(args.mixup_alpha, args.cutmix_alpha) < 0, "--mixup-alpha and --cutmix-alpha must be >= 0"),
        (args.model_ema_steps < 1, f"--model-ema-steps must be >= 1, got {args.model_ema_steps}"),
        (not 0 < args.model_ema_decay < 1, f"--model-ema-decay must be in (0, 1), got {args.model_ema_decay}"),
        (args.ra_reps < 1, f"--ra-reps must be >= 1, got {args.ra_reps}"),
        (args.workers is not None and args.workers < 0, f"--workers must be >= 0, got {args.workers}"),
        (args.max_bad_images < 0, f"--max-bad-images must be >= 0, got {args.max_bad_images}"),
        (args.print_freq <= 0, f"--print-freq must be > 0, got {args.print_freq}"),
        (args.warmup_steps < 0, f"--warmup-steps must be >= 0, got {args.warmup_steps}"),
        (args.max_steps is not None and args.max_steps <= 0, f"--max-steps must be > 0, got {args.max_steps}"),
        (min(args.train_crop_size, args.val_crop_size, args.val_resize_size) <= 0, "image sizes must be > 0"),
        (args.train_crop_size < smallest_image, f"--train-crop-size {args.train_crop_size} is too small for "
                                                f"DenseNet: the smallest it accepts is {smallest_image}"),
        (args.val_crop_size < smallest_image, f"--val-crop-size {args.val_crop_size} is too small for DenseNet: "
                                              f"the smallest it accepts is {smallest_image}"),
        (args.start_epoch < 0, f"--start-epoch must be >= 0, got {args.start_epoch}"),
        (not (args.resume or args.test_only) and args.start_epoch > 0 and args.start_epoch >= args.epochs,
         f"nothing to train: --start-epoch {args.start_epoch} is not below --epochs {args.epochs} (epochs are "
         f"numbered from 0); raise --epochs"),
        (args.val_crop_size > args.val_resize_size, "--val-crop-size cannot exceed --val-resize-size"),
        (args.num_classes is not None and args.num_classes <= 0, "--num_classes must be > 0"),
        (args.test_only and not (args.resume or args.pretrained),
         "--test-only needs weights: give --resume CHECKPOINT or --pretrained"),
        (not args.synthetic and not args.data_path, "no dataset: pass --data-path /path/to/imagenet (or --synthetic)"),
        (isinstance(args.keep_checkpoints, int) and args.keep_checkpoints < 1,
         "--keep-checkpoints must be >= 1 or 'all'"),
        (args.lr_step_size <= 0, "--lr-step-size must be > 0"),
        (not (finite(args.lr_gamma) and args.lr_gamma > 0), "--lr-gamma must be > 0"),
        (args.lr_warmup_epochs < 0, "--lr-warmup-epochs must be >= 0"),
        (args.clip_grad_norm is not None and not args.clip_grad_norm > 0, "--clip-grad-norm must be > 0"),
        (args.dist_timeout <= 0, "--dist-timeout must be > 0"),
        (not (finite(args.data_timeout) and args.data_timeout >= 0), "--data-timeout must be >= 0 (0: no limit)"),
        (args.world_size < 1 or args.dist_rank < 0, "--world-size must be >= 1 and --dist_rank >= 0"),
    ]
    for failed, message in checks:
        if failed:
            raise UserError(message)
    device_lib.parse_loss_scale(args.loss_scale_value)
    parse_device_ids(args.device_ids)
    launch = launch or launch_of(args)
    if not args.test_only and args.batch_size // launch.world_size < 2:  # BatchNorm trains on 2 images or more
        split = (f" is the global batch: {args.batch_size // launch.world_size} image(s) per step on each of "
                 f"{launch.world_size} ranks, and" if launch.world_size > 1 else " is too small to train:")
        raise UserError(f"--batch-size {args.batch_size}{split} BatchNorm needs at least 2 images per step; give "
                        f"--batch-size {2 * launch.world_size} or more")
    if args.resume and args.resume != "auto" and launch.rank == 0 and os.path.isdir(args.resume):
        raise UserError(f"--resume {args.resume} is a directory: to continue the run in it pass --resume auto "
                        f"--output-dir {args.resume}, or give its checkpoint file "
                        f"({os.path.join(args.resume, 'checkpoint.pth')})")
    if args.resume and args.resume != "auto" and launch.rank == 0 and not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume}: no such file")  # only rank 0 reads it (and sends it on)
    if args.pretrained_weight_path and not os.path.isfile(args.pretrained_weight_path):
        raise UserError(f"--pretrained_weight_path {args.pretrained_weight_path}: no such file")
    if args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if not args.synthetic:
        classes = data_lib.check_dataset_layout(args.data_path)
        if args.num_classes is not None and args.num_classes < len(classes):
            raise UserError(f"--num_classes {args.num_classes} is smaller than the {len(classes)} class folders "
                            f"in {args.data_path}/train; drop it or give at least {len(classes)}")
    # The output folder, worked out here once: --output-dir, else a new output/train/<time>-<model> (with
    # --resume auto, or in a job torchrun restarted: the newest run of --model there). From here on
    # args.output_dir is that folder and is never changed. Rank 0 alone creates, checks and locks it (the
    # other ranks write nothing), before the dataset scan and the model: a busy folder costs nothing.
    if args.output_dir == "":
        raise UserError("--output-dir is empty (an unset shell variable?): give a folder, or leave the flag out "
                        "for a new one under output/train")
    given = args.output_dir is not None
    resume_auto = args.resume == "auto" or utils.restarted_by_torchrun()
    args.output_dir, where = checkpoint.resolve_output_dir(args.output_dir, args.model, resume_auto, launch.rank == 0)
    found = where is not None and os.path.isdir(args.output_dir)
    if launch.rank == 0 and not given and args.test_only and args.resume == "auto" and not found:
        raise UserError(f"--test-only --resume auto: no {args.model} run with a checkpoint under "
                        f"{checkpoint.DEFAULT_OUTPUT_ROOT}; give --output-dir DIR or --resume FILE")
    if where and (found or not args.test_only):
        print(where, flush=True)
    if launch.rank == 0:
        checkpoint.prepare_output_dir(args.output_dir, args.overwrite, args.resume, args.test_only,
                                      utils.restarted_by_torchrun())


def parse_device_ids(text):
    if not text:
        return None
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--device_ids must be comma-separated integers, got {text!r}") from None


@dataclass(frozen=True)
class Run:
    """What this process is, worked out once from the arguments and the launcher; never changes."""
    device: device_lib.Device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    local_batch: int = 128
    workers: int = 0
    channels_last: bool = False
    resume: str = ""  # --resume, or "auto" in a job torchrun restarted

    @property
    def distributed(self):
        return self.world_size > 1


def setup(args, launch=None):
    """Join the launcher's job, bind this process's device and configure it; the Run."""
    launch = launch or launch_of(args)
    if args.distributed and launch.style == "single":
        raise UserError("--distributed needs a launcher: torchrun (sets RANK, LOCAL_RANK, WORLD_SIZE), srun (one "
                        "task per device), the original's RANK_ID and RANK_SIZE per process, or "
                        "test/train_full_8p.sh")
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    if launch.style == "single" and slurm_tasks > 1:  # an salloc shell or an sbatch script: srun starts the tasks
        log(f"Note: this Slurm allocation has SLURM_NTASKS={slurm_tasks}, but this process was not started by srun: "
            f"running as 1 process (`srun python main.py ...` runs {slurm_tasks} together)")
    distributed = launch.world_size > 1
    if distributed and args.batch_size % launch.world_size:
        raise UserError(f"--batch-size {args.batch_size} is the global batch and must divide evenly "
                        f"among {launch.world_size} ranks")
    device_ids = parse_device_ids(args.device_ids)
    if not distributed and args.device_id is not None:
        device_ids = [args.device_id]
    device = device_lib.resolve_device(args.device, launch.local_rank, device_ids)
    device_lib.configure_backends(device, args.deterministic)
    device_lib.set_threads_per_rank(device, launch.local_world_size)
    if distributed:
        if args.sync_bn:
            device_lib.check_sync_bn(device)
        utils.init_distributed(launch, device, args.dist_backend or device.dist_backend, args.dist_url,
                               args.dist_timeout)
    utils.seed_everything(args.seed + launch.rank)
    # --workers is per machine, shared among its ranks (the original's rule: ceil(workers / ranks per node)).
    workers = data_lib.default_workers(launch.local_world_size) if args.workers is None else \
        -(-args.workers // launch.local_world_size)
    return Run(device=device, rank=launch.rank, local_rank=launch.local_rank, world_size=launch.world_size,
               local_world_size=launch.local_world_size, local_batch=args.batch_size // launch.world_size,
               workers=workers, resume=args.resume or ("auto" if utils.restarted_by_torchrun() else ""),
               channels_last=device.channels_last_default if args.channels_last is None else args.channels_last)


def ranks_must_agree(args, run, amp, data, num_classes):
    """What every rank of a job must agree on, by the name the user knows it (for utils.check_ranks_agree):
    ranks launched by hand can differ in flags or data, and would then fail inside DDP, hang in a collective
    (different step counts) or train on silently (a different --batch-size)."""
    images = None if args.synthetic else (len(data.train_loader.dataset), len(data.val_loader.dataset))
    return {"the world size": run.world_size, "--model": args.model, "--batch-size": args.batch_size,
            "the number of classes": num_classes,
            "the class names (digest)": hashlib.sha256("\n".join(data.classes).encode()).hexdigest()[:12],
            "the train/val image counts": images, "--epochs": args.epochs, "--max-steps": args.max_steps,
            "--seed": args.seed, "--lr": args.lr, "--lr-scheduler": args.lr_scheduler,
            "--ra-sampler": (args.ra_sampler, args.ra_reps), "--model-ema": args.model_ema,
            "the precision": amp.describe().split("; ")[0]}


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------

def main(args, stop=None):
    """The run: set-up, data, trainer, resume, then evaluation or the epoch loop. `stop`: the StopSignal that
    run() installed before the set-up (main() installs one when called on its own)."""
    launch = launch_of(args)
    validate_args(args, launch)
    run = setup(args, launch)
    amp = device_lib.build_mixed_precision(args, run.device)  # before any data is read: a missing apex fails fast
    # A signal stops the run at once while there is nothing to save (data scan, model build, evaluation), and
    # after the step in flight while training (lifecycle.StopSignal.deferred).
    stop = stop or lifecycle.StopSignal()
    utils.record_peers()  # every rank's host and pid: a rank that dies can be named
    # DataLoader's SIGCHLD handler raises "worker killed" at whatever line the trainer is on -- possibly between
    # an optimizer step and its step count. Blocked, a dead worker (the OOM killer) is found by the loader
    # itself when the next batch is fetched (next_batch, within seconds): at a step boundary, where it is saved.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    log(f"Device: {run.device.describe()}; world size {run.world_size}; "
        + (f"global batch {args.batch_size} = {run.world_size} x {run.local_batch}" if run.distributed
           else f"batch {args.batch_size}") + f"; workers {run.workers} per process")
    data = build_data(args, run)
    num_classes = args.num_classes or len(data.classes)
    utils.check_ranks_agree(ranks_must_agree(args, run, amp, data, num_classes))
    trainer = build_trainer(args, run.device, num_classes, amp, channels_last=run.channels_last,
                            distributed=run.distributed, local_batch=run.local_batch, world_size=run.world_size,
                            log=log)
    log(f"Model: {args.model}, {num_classes} classes, "
        f"{sum(p.numel() for p in trainer.model_without_ddp.parameters()) / 1e6:.1f}M parameters; "
        f"{'channels_last' if run.channels_last else 'NCHW'}; precision: {amp.describe()}")
    if trainer.ema is not None:
        log(f"Model EMA: decay {trainer.ema.decay:.6f} every {args.model_ema_steps} steps (from --model-ema-decay "
            f"{args.model_ema_decay} adjusted for this batch and length)")
    start = checkpoint.resume(args, run.resume, trainer, data.classes, run.rank, run.world_size, log=log)
    if args.test_only:
        if data.val_loader is None:
            raise UserError("--test-only needs a dataset (not --synthetic)")
        evaluate_all(trainer, data.val_loader, args)
        return 0
    if start.epoch >= args.epochs and start.pending is None:
        log(f"Nothing to train: {start.path or 'the run'} has finished all {start.epoch} epochs "
            f"(--epochs {args.epochs}); to train on, resume it with a larger --epochs")
        return 0

    lock = claim_output_dir(args, resuming=start.path is not None)
    checkpoint.write_run_description(args.output_dir, describe_run(args, run, amp))
    log(f"Start training: epochs {start.epoch}..{args.epochs - 1}, lr {args.lr} ({args.lr_scheduler}, "
        f"updated every {args.lr_update})")
    record = RunRecord(args.output_dir, start.best_acc1, tensorboard=args.tensorboard)
    # Steps per epoch from the global batch: the same on any number of ranks (ceil(ceil(N/W)/(B/W)) == ceil(N/B)).
    steps_per_epoch = len(data.train_loader) if data.train_sampler is None else \
        math.ceil(data.train_sampler.epoch_length() / args.batch_size)
    epoch = start.epoch
    try:
        if start.pending is not None:  # stopped during that epoch's evaluation: evaluate it before going on
            log(f"Epoch {epoch - 1} was trained but not evaluated: evaluating it first")
            finish_epoch(trainer, data, args, epoch - 1, start.pending, record, start.classes)
        for epoch in range(start.epoch, args.epochs):
            first = epoch == start.epoch
            start_step = start.step if first else 0
            if data.train_sampler is not None:  # the epoch's order after the samples already trained on
                data.train_sampler.set_epoch(epoch, start_step * args.batch_size)
            if first and start.rng is not None:
                utils.set_rng_state(start.rng, run.device)  # continue the random streams exactly where they were
            try:
                with stop.deferred():  # a signal now: the step in flight finishes, then the epoch is saved
                    train_stats = train_one_epoch(trainer, data.train_loader, epoch, start_step, steps_per_epoch,
                                                  args, stop, start.partial if first else None)
                    trainer.sync_buffers()  # every rank evaluates, and rank 0 saves, the same BatchNorm statistics
                    # The epoch's training is on disk before evaluation starts: a signal during evaluation
                    # (minutes on ImageNet) loses nothing, and the resumed run evaluates this epoch first.
                    checkpoint.save_checkpoints(checkpoint.training_state(
                        trainer, args, epoch + 1, 0, record.best_acc1, start.classes, pending=train_stats),
                        args.output_dir)
            except Preempted as p:
                return save_preempted(trainer, args, epoch, p, record.best_acc1, start.classes, stop)
            if stop.requested:
                log(f"Preempted by {stop.signal_name} at the end of epoch {epoch}: checkpoint saved; resume with "
                    f"--resume auto (it evaluates epoch {epoch} first)")
                return EXIT_PREEMPTED
            finish_epoch(trainer, data, args, epoch, train_stats, record, start.classes)
            epochs_left = args.epochs - epoch - 1
            if epochs_left:
                per_epoch = (time.time() - record.start_time) / len(record.history)  # training and evaluation
                log(f"Run: {epochs_left} epochs left, about {utils.format_eta(per_epoch * epochs_left)} to go "
                    f"(evaluation included)")
    except lifecycle.Interrupted as e:
        # Outside a training step: evaluation, or between epochs. Every trained epoch is saved already.
        log(f"Preempted by {e.signal_name} during {e.where or f'epoch {epoch}'}: the epoch's training is saved in "
            f"{os.path.join(args.output_dir, 'checkpoint.pth')}; resume with --resume auto (it evaluates an epoch "
            f"stopped during its evaluation first)")
        return EXIT_PREEMPTED
    record.close()
    print_run_summary(record.history, record.best_acc1, record.best_epoch, time.time() - record.start_time)
    if lock:
        lock.release()
    return 0


def finish_epoch(trainer, data, args, epoch, train_stats, record, classes):
    """Evaluate a trained epoch, add its metrics.jsonl row, and save it as the epoch's checkpoint (and the best)."""
    try:
        val_stats = evaluate_all(trainer, data.val_loader, args)
    except lifecycle.Interrupted as e:
        e.where = f"the evaluation of epoch {epoch}"
        raise
    is_best = record.add(epoch, train_stats, val_stats)  # the row before the checkpoint: a kill in between
    # leaves a checkpoint still marked "evaluation pending", whose resume evaluates (and records) it again
    checkpoint.save_checkpoints(checkpoint.training_state(trainer, args, epoch + 1, 0, record.best_acc1, classes),
                                args.output_dir, epoch=epoch, is_best=is_best, keep=args.keep_checkpoints)


def save_preempted(trainer, args, epoch, p, best_acc1, classes, stop):
    """Training stopped at a step boundary (a signal, a stalled or failed loader, a lost peer): save where it is.

    The weights are those of the last completed step: a failure shows up in a collective before the optimizer
    step (the gradient all-reduce, or the step agreement), so no rank has half-applied a step."""
    where = f"epoch {epoch} step {p.steps_done}"
    saved = os.path.join(args.output_dir, "checkpoint.pth")
    if p.error is not None and not p.trained:  # a failure before this attempt trained anything: nothing new
        print(f"error: {p.error}; stopped at {where}, before training anything new (nothing saved)",
              file=sys.stderr, flush=True)
        return EXIT_FAILED
    with stop.deferred():  # a further signal during the save: the save completes (a second one exits at once)
        state = checkpoint.training_state(trainer, args, epoch, p.steps_done, best_acc1, classes,
                                          partial=p.partial, all_ranks=not p.peer_lost)
        checkpoint.save_checkpoints(state, args.output_dir)
    if p.error is None:
        log(f"Preempted by {stop.signal_name or 'a signal to another rank'} at {where}: checkpoint saved to "
            f"{saved}; resume with --resume auto")
        return EXIT_PREEMPTED
    if utils.is_main_process():
        print(f"error: {p.error}; stopped at {where}, checkpoint saved to {saved}: resume with --resume auto",
              file=sys.stderr, flush=True)
    else:
        print(f"error: {p.error}; stopped at {where} (rank 0 saves the checkpoint)", file=sys.stderr, flush=True)
    return EXIT_FAILED


class RunRecord:
    """The run's epochs so far: metrics.jsonl rows (rank 0), TensorBoard scalars, the best Acc@1."""

    def __init__(self, output_dir, best_acc1, tensorboard=False):
        self.output_dir = output_dir
        self.best_acc1 = best_acc1
        self.best_epoch = None
        self.history = []
        self.start_time = time.time()
        self.tensorboard = utils.TensorBoardLogger(output_dir) if tensorboard and utils.is_main_process() else None

    def add(self, epoch, train_stats, val_stats):
        """Record an evaluated epoch; True if it is the best so far."""
        is_best = val_stats.get("acc1", 0.0) > self.best_acc1
        if is_best:
            self.best_acc1, self.best_epoch = val_stats["acc1"], epoch
        self.history.append({"epoch": epoch, **train_stats, **{f"val_{k}": v for k, v in val_stats.items()}})
        checkpoint.append_metrics(self.output_dir, self.history[-1])
        if self.tensorboard:
            self.tensorboard.log(self.history[-1])
        return is_best

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()


class Data(NamedTuple):
    train_loader: object
    train_sampler: Optional[data_lib.ResumableDistributedSampler]  # None for --synthetic
    val_loader: object                                              # None for --synthetic
    classes: list


def build_data(args, run):
    if args.synthetic:
        classes = [str(i) for i in range(args.num_classes or 1000)]
        loader = data_lib.SyntheticLoader(run.local_batch, args.train_crop_size, len(classes), args.max_steps or 100,
                                          args.seed, pin_memory=run.device.is_accelerator)
        return Data(loader, None, None, classes)
    if args.cache_dataset:
        log("Note: --cache-dataset is accepted for the original's scripts and does nothing here: the file list "
            "is scanned at start-up (seconds), and the original's cache held a pickled dataset object")
    data_lib.check_shared_memory(run.workers, run.local_batch, max(args.train_crop_size, args.val_crop_size),
                                 run.local_world_size)
    layout = data_lib.find_layout(args.data_path)  # class folders, the Kaggle download, or a flat val/
    train_set = data_lib.train_dataset(layout.train_root, args.train_crop_size,
                                       args.interpolation, args.crop_scale, args.hflip_prob, args.auto_augment,
                                       args.ra_magnitude, args.augmix_severity, args.random_erase,
                                       fast_decode=args.fast_decode, seed=args.seed)
    val_set = data_lib.ImageListDataset(layout.val_samples, layout.classes, data_lib.eval_transform(
        args.val_resize_size, args.val_crop_size, args.interpolation), seed=args.seed, root=layout.val_root)
    empty = train_set.classes_without_images()
    if empty:
        warn(f"{len(empty)} of {len(train_set.classes)} classes have no usable training image and will never be "
             f"learned: " + ", ".join(f"{name} ({why})" for name, why in empty[:10]))
    for skipped in (data_lib.describe_repeats(train_set.scan, layout.train_root),
                    data_lib.describe_repeats(layout.val_scan, layout.val_root)):
        if skipped and run.rank == 0:
            warn(skipped)  # symlink loops, second names of a file: each real file is used once
    train_sampler = data_lib.ResumableDistributedSampler(len(train_set), run.world_size, run.rank, args.seed,
                                                         repeats=args.ra_reps if args.ra_sampler else 1)
    if args.batch_size > train_sampler.epoch_length() and run.rank == 0 and not args.test_only:
        warn(f"--batch-size {args.batch_size} is larger than the training set ({train_sampler.epoch_length()} "
             f"images): every epoch is a single step of {train_sampler.epoch_length()} images; lower --batch-size "
             f"(and --lr with it) to train more than one step per epoch")
    val_sampler = data_lib.ExactEvalSampler(len(val_set), run.world_size, run.rank)
    pin = run.device.is_accelerator
    train_loader = data_lib.make_loader(train_set, train_sampler, run.local_batch, run.workers, pin, args.seed)
    val_loader = data_lib.make_loader(val_set, val_sampler, run.local_batch, run.workers, pin, args.seed)
    log(f"Data: {len(train_set)} train / {len(val_set)} val images, {len(train_set.classes)} classes from "
        f"{args.data_path} (layout: {layout.kind})")
    return Data(train_loader, train_sampler, val_loader, train_set.classes)


def claim_output_dir(args, resuming):
    """Rank 0's lock on the output folder (taken by validate_args, before the dataset scan; held until the
    process ends) and a clean start there: a fresh run starts a fresh metrics.jsonl."""
    if not utils.is_main_process() or not args.output_dir:
        return None
    lock = checkpoint.lock_output_dir(args.output_dir)
    if not resuming:
        if args.resume == "auto" and not utils.restarted_by_torchrun():
            # Checkpoints were there by name (validate_args) but none loaded: still another run's files.
            checkpoint.check_fresh_output_dir(args.output_dir, args.overwrite, nothing_to_resume=True)
        checkpoint.start_fresh_metrics(args.output_dir)  # checked before: nothing of another run's is lost
    checkpoint.remove_stale_temp_files(args.output_dir)
    return lock


def describe_run(args, run, amp):
    """run.json: what the launchers' summary reports besides metrics.jsonl."""
    return {"model": args.model, "network": f"DenseNet{args.model[len('densenet'):]}_for_PyTorch",
            "world_size": run.world_size, "batch_size": args.batch_size, "local_batch": run.local_batch,
            "device": run.device.type, "device_name": run.device.describe(), "precision": amp.describe(),
            "epochs": args.epochs, "synthetic": args.synthetic}


def print_run_summary(history, best_acc1, best_epoch, total_seconds):
    # Each epoch's steady-state img/s, or its whole-epoch rate when it was too short to have one.
    fps = [h.get("fps") or h.get("epoch_fps") for h in history if h.get("fps") or h.get("epoch_fps")]
    log("Run summary")
    log(f"  epochs trained : {len(history)}")
    log(f"  best Acc@1     : {best_acc1:.3f}" + (f" (epoch {best_epoch})" if best_epoch is not None else ""))
    log(f"  total time     : {utils.format_eta(total_seconds)}")
    log(f"  mean FPS       : {sum(fps) / len(fps):.2f} img/s" if fps else "  mean FPS       : n/a")


# ----------------------------------------------------------------------------
# One epoch of training
# ----------------------------------------------------------------------------

class Preempted(Exception):
    """Training stopped at a step boundary: by a signal (error None), or by a failure the trainer survives (a
    stalled or dead data loader, a lost peer: error is the one-line reason). steps_done: the epoch's completed
    steps; partial: the epoch's metric sums so far (None when a peer is lost and ranks cannot sum them)."""

    def __init__(self, steps_done, trained, partial=None, error=None, peer_lost=False):
        super().__init__(error or f"preempted after {steps_done} steps")
        self.steps_done = steps_done
        self.trained = trained  # steps of this attempt that trained
        self.partial = partial
        self.error = error
        self.peer_lost = peer_lost


class BufferGuard:
    """The model's buffers (BatchNorm running statistics) as they were before the step in flight.

    A collective that fails inside a step (a lost peer) fails in the backward pass, after the forward pass has
    updated them with the step's batch: put back, the saved state is exactly that of the last completed step,
    and a restart from it trains as if nothing had happened."""

    def __init__(self, model):
        self.buffers = [b for b in model.buffers()]
        self.copies = [b.detach().clone() for b in self.buffers]

    def save(self):
        torch._foreach_copy_(self.copies, self.buffers)

    def restore(self):
        torch._foreach_copy_(self.buffers, self.copies)


class Meter:
    """Running sums on the device, read on the host only when asked (that read is the one sync).

    Loss sums are float32 (a few steps' worth at most: they are folded into a host double at every read);
    correct top-1, top-5 and image counts are int64. No float64 on the device: Ascend NPUs have none."""

    def __init__(self, device):
        self.loss = torch.zeros((), dtype=torch.float32, device=device)
        self.counts = torch.zeros(3, dtype=torch.int64, device=device)  # correct@1, correct@5, images
        self.host_loss = 0.0

    def update(self, loss_sum, output, targets):
        self.loss += loss_sum.float()
        self.counts += utils.accuracy_counts(output, targets)

    def sums(self, all_ranks=False):
        """[loss sum, correct@1, correct@5, images] so far: this rank's, or summed over all ranks."""
        self.host_loss += float(self.loss)
        self.loss.zero_()
        values = [self.host_loss, *self.counts.tolist()]
        return utils.all_reduce(values) if all_ranks else values

    def read(self, all_ranks=False):
        """(mean loss, acc1 %, acc5 %, images): this rank's, or over all ranks."""
        return averages(self.sums(all_ranks))


def averages(sums):
    """[loss sum, correct@1, correct@5, images] -> (mean loss, acc1 %, acc5 %, images)."""
    loss, c1, c5, n = sums
    return loss / max(n, 1), 100 * c1 / max(n, 1), 100 * c5 / max(n, 1), int(n)


class Window:
    """Wall time, loader waits, steps and images since the last step line: its img/s, time: and data:."""

    def __init__(self):
        self.start = time.perf_counter()
        self.data_time = 0.0
        self.steps = 0
        self.images = 0

    def fields(self, now):
        """(img/s, seconds per step, seconds per step waiting for the loader)."""
        elapsed = now - self.start
        return self.images / elapsed, elapsed / max(self.steps, 1), self.data_time / max(self.steps, 1)


def next_batch(iterator, timeout, stage):
    """next(iterator), or None at its end. A loader that delivers nothing for `timeout` seconds, or whose
    worker died (the OOM killer), is one UserError naming the stage, not a hang or a traceback."""
    try:
        with lifecycle.data_timeout(timeout, stage):
            return next(iterator, None)
    except lifecycle.DataStall as e:
        raise UserError(str(e)) from None
    except (RuntimeError, ConnectionError, EOFError) as e:
        # A dead worker shows up as DataLoader's own RuntimeError, or as a broken pipe to it when the batch it
        # had queued is collected (ConnectionResetError, EOFError).
        if isinstance(e, RuntimeError) and "DataLoader worker" not in str(e):
            raise
        reason = str(e).splitlines()[0].rstrip(". ") if str(e) else type(e).__name__
        raise UserError(f"{stage}: a data loading worker died ({reason}); out of memory? try fewer --workers or "
                        f"a smaller --batch-size") from None


class Feed:
    """The training batches. A stop signal while waiting for one, a stalled loader or a dead worker end the
    feed (None) and are remembered, so the ranks can agree to stop at the next step boundary."""

    def __init__(self, loader, stop, timeout, epoch):
        self.iterator = iter(loader)
        self.stop = stop
        self.timeout = timeout
        self.epoch = epoch
        self.interrupted = False
        self.error = None

    def next(self, step):
        if self.interrupted or self.error:
            return None
        try:
            with self.stop.waiting():
                return next_batch(self.iterator, self.timeout, f"training data (epoch {self.epoch}, step {step + 1})")
        except lifecycle.Interrupted:
            self.interrupted = True
        except UserError as e:
            self.error = str(e)  # said once, when the ranks have stopped (save_preempted)
        return None


def start_agreement(batch, feed, stop, distributed):
    """(skip, stop, fail) for the step that trains `batch`, as a function to call just before that step.

    skip: some rank has fewer than 2 readable images (BatchNorm cannot train on one when the last feature map
    is 1x1), so all ranks skip the step together, as DDP's all-reduce pairs them up; stop: a signal reached
    some rank; fail: some rank's data failed. Across ranks this is one small collective, started when the
    batch arrives -- a step ahead of its use -- so that it runs while this rank computes the step before, not
    in the step's critical path; a signal is then noticed one step later than in a single process."""
    n = 0 if batch is None else len(batch.targets)
    if not distributed:
        return lambda: (n < 2, stop.requested or feed.interrupted, feed.error is not None)
    return utils.any_rank_async(n < 2, stop.requested or feed.interrupted, feed.error is not None)


def train_one_epoch(trainer, loader, epoch, start_step, steps, args, stop, partial=None):
    """One epoch of `steps` from `start_step`; the epoch's metrics (with `partial`, the sums of an earlier,
    interrupted attempt at it). Raises Preempted at a step boundary when signalled or when data or a peer fails."""
    trainer.model.train()
    dev = trainer.device.torch_device
    distributed = utils.is_dist()
    steps = min(steps, args.max_steps or math.inf)
    # With --compile the first step is compilation: never inside the FPS window, even with --warmup-steps 0.
    throughput = utils.Throughput(trainer.device, warmup=max(args.warmup_steps, 1) if args.compile else
                                  args.warmup_steps)
    meter = Meter(dev)
    window = Window()
    bad_files = []
    first_step_time = None
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=dev)  # non-finite loss, found without a sync
    last_loss = torch.zeros((), device=dev)
    feed = Feed(loader, stop, args.data_timeout, epoch)
    guard = BufferGuard(trainer.model_without_ddp) if distributed else None
    trained = 0  # steps of this attempt that trained (not skipped)
    # One clock reading: the first step line's 'time:' IS first_step_time (the perf summary's CompileTime,
    # which the original's launcher greps from that line), not a reading taken a context switch earlier.
    epoch_start = window.start = time.perf_counter()
    batch = feed.next(start_step)
    agreement = start_agreement(batch, feed, stop, distributed)
    window.data_time += time.perf_counter() - epoch_start
    step = start_step
    while step < steps:
        try:
            skip, stop_now, failed = agreement()
        except RuntimeError as e:
            raise peer_lost(e, step, trained, epoch) from None
        if stop_now or failed:
            check_finite(first_bad_step, epoch)
            error = None if not failed else feed.error or "another rank's data loading failed (see its log)"
            raise Preempted(step, trained, meter.sums(all_ranks=True), error=error)
        if batch is None:  # the loader ended early (cannot happen with our samplers): the epoch is over
            break
        fetch_start = time.perf_counter()
        following = feed.next(step + 1) if step + 1 < steps else None
        agreement = start_agreement(following, feed, stop, distributed) if step + 1 < steps else None
        window.data_time += time.perf_counter() - fetch_start
        if batch.bad:
            report_bad_files(batch.bad, bad_files, args.max_bad_images)
        n = len(batch.targets)
        if skip:
            if n == 1:  # (a batch of 0 readable images has had its files named already)
                warn(f"epoch {epoch} step {step + 1}: skipped a batch of 1 readable image (training needs 2)")
            n = 0
        else:
            lr = learning_rate(args, epoch + step / steps)
            if guard is not None:
                guard.save()
            try:
                output, loss, targets = trainer.step(batch.images, batch.targets, lr,
                                                     update_ema=(step + 1) % args.model_ema_steps == 0,
                                                     ema_warmup=epoch < args.lr_warmup_epochs)
            except RuntimeError as e:
                if not (distributed and is_peer_failure(e)):
                    raise
                guard.restore()
                raise peer_lost(e, step, trained, epoch) from None
            trained += 1
            first_bad_step.copy_(torch.where(~torch.isfinite(loss) & (first_bad_step < 0), step, first_bad_step))
            meter.update(loss * n, output, targets)
            last_loss = loss
        throughput.step(n)
        window.steps += 1
        window.images += n
        if step == start_step or (step + 1) % args.print_freq == 0 or step + 1 == steps:
            check_finite(first_bad_step, epoch)
            trainer.device.synchronize()
            now = time.perf_counter()
            if step == start_step:
                first_step_time = now - epoch_start
                if args.compile:
                    log(f"Train [{epoch}] first step took {first_step_time:.1f} s (torch.compile compilation; "
                        f"excluded from FPS)")
            eta = (now - epoch_start) / (step + 1 - start_step) * (steps - step - 1)
            log_step(epoch, step, steps, eta, trainer, float(last_loss), meter.read(), window.fields(now))
            window = Window()
        batch = following
        step += 1
    check_finite(first_bad_step, epoch)
    elapsed = time.perf_counter() - epoch_start
    this_attempt = meter.sums(all_ranks=True)
    fps, epoch_fps = report_throughput(throughput, epoch, args.synthetic, elapsed, this_attempt[3])
    loss_mean, acc1, acc5, seen = averages([a + b for a, b in zip(this_attempt, partial or [0, 0, 0, 0])])
    n_bad = int(utils.all_reduce([len(bad_files)])[0])
    resumed = "" if not start_step else f" (the epoch was resumed at step {start_step + 1}: " + (
        f"{seen} images in all)" if partial else "the earlier attempt's metrics were not saved)")
    log(f"Train [{epoch}] done in {utils.format_eta(elapsed)}: train loss {loss_mean:.4f}  acc1 {acc1:.3f}  "
        f"images {int(this_attempt[3])}{resumed}  unreadable images {n_bad}")
    if trainer.amp.scaler is not None and int(trainer.amp.skipped_steps):
        log(f"Train [{epoch}] {int(trainer.amp.skipped_steps)} steps skipped so far for fp16 gradient overflow "
            f"(loss scale now {trainer.amp.current_scale():g})")
    record = {"lr": trainer.optimizer.param_groups[0]["lr"], "train_loss": loss_mean, "train_acc1": acc1,
              "train_acc5": acc5, "fps": fps, "epoch_fps": epoch_fps, "epoch_time": elapsed, "images": seen,
              "unreadable_images": n_bad, "last_loss": float(last_loss), "first_step_time": first_step_time}
    if start_step:
        record["resumed"] = True  # and, when `partial` was saved, the metrics cover both attempts
    return record


PEER_FAILURE_WORDS = ("connection reset", "connection closed", "broken pipe", "connection refused", "timed out",
                      "timeout", "nccl", "hccl", "gloo")


def is_peer_failure(error):
    """Whether an exception from a step is a collective that failed (a peer died, the network dropped)."""
    text = str(error).lower()
    return isinstance(error, torch.distributed.DistError) or any(w in text for w in PEER_FAILURE_WORDS)


def peer_lost(error, step, trained, epoch):
    """The Preempted for a collective that failed at `step`: which peer is gone, when it can be told."""
    time.sleep(0.5)  # a peer that failed has usually exited by now: it can be named
    gone = utils.lost_peers()
    who = f"lost rank {', '.join(map(str, gone))}" if gone else "lost a peer (on another machine, or it hung)"
    detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return Preempted(step, trained, None, error=f"{who} at epoch {epoch} step {step + 1} ({detail})",
                     peer_lost=True)


def log_step(epoch, step, steps, eta, trainer, last_loss, totals, window):
    """The step line, in the original's MetricLogger layout, so its launchers' greps keep working: only these
    lines hold 'Epoch:' and 'eta:'; img/s is this rank's wall-clock rate since the previous line (data loading
    included), time: the seconds per step and data: the seconds per step spent waiting for the loader."""
    loss_mean, acc1, acc5, _ = totals
    images_per_s, step_time, data_time = window
    fields = [f"Epoch: [{epoch}]", f"[{step + 1:>{len(str(steps))}}/{steps}]", f"eta: {utils.format_eta(eta)}",
              f"lr: {trainer.optimizer.param_groups[0]['lr']:.6f}", f"img/s: {images_per_s:.1f}",
              f"loss: {last_loss:.4f} ({loss_mean:.4f})", f"acc1: {acc1:.3f}", f"acc5: {acc5:.3f}",
              f"time: {step_time:.4f}", f"data: {data_time:.4f}"]
    if trainer.amp.scaler is not None:
        fields.append(f"skipped: {int(trainer.amp.skipped_steps)}")
    log("  ".join(fields))


def report_throughput(throughput, epoch, synthetic, elapsed, images_epoch):
    """Log and return the epoch's global img/s: (steady state, whole epoch).

    Steady state: all ranks' images over the slowest rank's window after the warm-up steps (None when the
    epoch had too few steps). Whole epoch: `images_epoch` (all ranks' images this attempt trained on) over the
    slowest rank's whole epoch, warm-up, first step and data loading included: never blank, for the summary
    of a short epoch."""
    epoch_fps = images_epoch / max(utils.all_reduce([elapsed], op="max")[0], 1e-9)
    if throughput.finish() is None:
        log(f"Train [{epoch}] FPS: {epoch_fps:.2f} img/s over the whole epoch, warm-up included (fewer than "
            f"{throughput.warmup + 1} steps, so no steady-state figure; lower --warmup-steps)")
        return None, epoch_fps
    images_all = utils.all_reduce([throughput.images])[0]
    window = utils.all_reduce([throughput.end - throughput.start], op="max")[0]
    fps = images_all / window
    log(f"Train [{epoch}] FPS: {fps:.2f} img/s (steady state: steps {throughput.first_step}-{throughput.steps} "
        f"of {throughput.steps}, {int(images_all)} images in {window:.2f} s, all ranks, data loading "
        f"{'excluded (synthetic)' if synthetic else 'included'})")
    return fps, epoch_fps


def report_bad_files(bad, seen_so_far, max_bad_images):
    for path, reason in bad:
        warn(f"skipped unreadable image {path} ({reason})")
    seen_so_far.extend(bad)
    if len(seen_so_far) > max_bad_images:
        raise UserError(f"more than --max-bad-images {max_bad_images} unreadable training images "
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

def evaluate_all(trainer, loader, args):
    """The model's validation metrics, then the EMA's as ema_*; {} without a validation set."""
    if loader is None:
        return {}
    stats = evaluate(trainer.model_without_ddp, loader, trainer, args)
    if trainer.ema is not None:
        stats.update({f"ema_{k}": v for k, v in evaluate(trainer.ema.module, loader, trainer, args, "EMA ").items()})
    return stats


@torch.no_grad()
def evaluate(model, loader, trainer, args, log_prefix=""):
    """Loss, Acc@1 and Acc@5 over the whole validation set: every image counted once, summed over ranks."""
    model.eval()
    meter = Meter(trainer.device.torch_device)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    n_bad = 0
    start = time.perf_counter()
    iterator = iter(loader)
    for step in range(len(loader)):
        batch = next_batch(iterator, args.data_timeout, f"validation data (batch {step + 1} of {len(loader)})")
        if batch is None:
            break
        for path, reason in batch.bad:
            warn(f"skipped unreadable validation image {path} ({reason})")
        n_bad += len(batch.bad)
        if not len(batch.targets):
            continue
        images = trainer.normalize(batch.images)
        targets = batch.targets.to(trainer.device.torch_device, non_blocking=True)
        with trainer.amp.autocast():
            output = model(images)
        meter.update(criterion(output.float(), targets), output, targets)
        if (step + 1) % args.print_freq == 0:
            log(f"Test: {log_prefix}[{step + 1}/{len(loader)}]")
    loss, acc1, acc5, n = meter.read(all_ranks=True)
    n_bad = int(utils.all_reduce([n_bad])[0])
    if n == 0:  # an Acc@1 of 0.000 "on 0 images" would look like a result
        raise UserError(f"evaluation covered 0 images ({n_bad} unreadable): check the validation images of "
                        f"{args.data_path}")
    log(f"Test: {log_prefix}loss {loss:.4f}, {n} images in {time.perf_counter() - start:.1f} s")
    log(f" * {log_prefix}Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} ({n} images"
        + (f", {n_bad} unreadable skipped)" if n_bad else ")"))
    return {"acc1": acc1, "acc5": acc5, "loss": loss, "images": n, "time": time.perf_counter() - start}


# ----------------------------------------------------------------------------

def open_log_file(args):
    """--log-file: everything this process writes to its stdout and stderr goes to this file too ({rank} becomes
    the global rank), native libraries' output included, as the original's `> train_$RANK_ID.log 2>&1`."""
    path = args.log_file.replace("{rank}", str(launch_of(args).rank))
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        lifecycle.capture_output(path)
    except OSError as e:
        raise UserError(f"--log-file {path}: cannot write there ({e.strerror or e})") from None


# What a run stopped by a signal outside the training loop was doing: the innermost of these on its stack.
STAGES = {"validate_args": "the dataset scan", "setup": "set-up", "init_distributed": "joining the process group",
          "build_data": "the dataset scan", "build_trainer": "the model build", "resume": "resume",
          "evaluate": "evaluation", "train_one_epoch": "training"}


def run(argv=None):
    """Entry point: known failures become one line on stderr and a meaningful exit code (cli.py), and every
    way out ends within seconds: no exit waits for the loader's workers (lifecycle.py)."""
    args = get_args_parser().parse_args(argv)
    lifecycle.guard_streams()  # a closed or full stdout must not end the run
    stop = lifecycle.StopSignal()  # from the start: a signal during the set-up stops at once
    code = 1
    try:
        error = run_tool(open_log_file, args) if args.log_file else None
        lifecycle.enable_faulthandler()  # after the capture: a crash's traceback lands in the rank's log
        code = error or run_tool(functools.partial(main, stop=stop), args)
    except lifecycle.Interrupted as e:
        where = e.where or lifecycle.innermost_stage(e.__traceback__, STAGES)
        print(f"stopped by {e.signal_name}" + (f" during {where}" if where else "") + " (nothing to save)",
              file=sys.stderr, flush=True)
        code = 128 + e.signum
    except Exception:
        traceback.print_exc()  # a bug or an unexpected failure: the full traceback, into the --log-file too
    finally:
        lifecycle.stop_children()
        if utils.is_dist():
            if code:  # a failing rank must not leave its peers waiting in a collective: torchrun stops them
                lifecycle.close_output(timeout=2)
                os._exit(code)
            utils.cleanup_distributed()
        stop.restore()  # (for callers in this process: tests)
    return code  # (--log-file's capture ends at exit, after every other exit handler has had its say)


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    sys.exit(run())
