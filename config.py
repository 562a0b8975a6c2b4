"""The run's configuration: the command line (get_args_parser) and the checks that need nothing but the
arguments (validate_args: one line and exit code 2 before any work). What needs the file system or the
launcher (files that must exist, the data set, the output folder) is checked by main.preflight.

--model, the image sizes and --interpolation default to None: a resumed or --test-only run takes them from the
checkpoint it reads (the architecture and the preprocessing the model was trained with), a fresh run from
FROM_CHECKPOINT's defaults (resolve_from_checkpoint)."""
import argparse
import math

import checkpoint
import cli
import densenet
import device as device_lib
from cli import UserError
from data import AUTO_AUGMENT
from decode import INTERPOLATIONS



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
    g("--train-crop-size", type=int, default=None,
      help="training crop (RandomResizedCrop) size; resuming: the checkpoint's unless given (default: 224)")
    g("--val-resize-size", type=int, default=None,
      help="validation resize, shorter side; resuming or --test-only: the checkpoint's unless given (default: 256)")
    g("--val-crop-size", type=int, default=None,
      help="validation centre crop; resuming or --test-only: the checkpoint's unless given (default: 224)")
    g("--interpolation", default=None, choices=sorted(INTERPOLATIONS),
      help="resize filter; resuming or --test-only: the checkpoint's unless given (default: bilinear)")
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
    g("--model", default=None, choices=sorted(densenet.MODELS),
      help=f"architecture; resuming or --test-only: the checkpoint's unless given (default: {DEFAULT_MODEL})")
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
    g("--auto-augment", default=None, choices=list(AUTO_AUGMENT), help="automatic augmentation policy")
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
    g("--restart-epoch", action="store_true",
      help="resume a checkpoint saved mid-epoch from the start of its epoch (for when its training images changed, "
           "or its --batch-size: the rest of that epoch's sample order is then not the rest of what was trained)")
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


def validate_args(args, world_size=1):
    """Everything the arguments alone can tell (no file is touched): one line and exit code 2 on the first
    problem. `world_size`: the job's number of ranks (the batch is divided among them)."""
    finite = math.isfinite
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
        (args.start_epoch < 0, f"--start-epoch must be >= 0, got {args.start_epoch}"),
        (not (args.resume or args.test_only) and args.start_epoch > 0 and args.start_epoch >= args.epochs,
         f"nothing to train: --start-epoch {args.start_epoch} is not below --epochs {args.epochs} (epochs are "
         f"numbered from 0); raise --epochs"),
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
        (args.output_dir == "", "--output-dir is empty (an unset shell variable?): give a folder, or leave the "
                                "flag out for a new one under output/train"),
    ]
    for failed, message in checks:
        if failed:
            raise UserError(message)
    check_image_sizes(args)
    device_lib.parse_loss_scale(args.loss_scale_value)
    device_lib.parse_device_ids(args.device_ids)
    if not args.test_only and args.batch_size // world_size < 2:  # BatchNorm trains on 2 images or more
        split = (f" is the global batch: {args.batch_size // world_size} image(s) per step on each of "
                 f"{world_size} ranks, and" if world_size > 1 else " is too small to train:")
        raise UserError(f"--batch-size {args.batch_size}{split} BatchNorm needs at least 2 images per step; give "
                        f"--batch-size {2 * world_size} or more")
    if world_size > 1 and args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} is the global batch and must divide evenly "
                        f"among {world_size} ranks")


# DenseNet halves the image 5 times (stride-2 stem conv and max-pool, three 2x2 average pools): 29 px is the
# smallest input that still leaves a 1x1 feature map (all four depths; test_first_contact measures it).
SMALLEST_IMAGE = 29
# The preprocessing flags a checkpoint records and a resumed or --test-only run takes from it, with the values a
# fresh run uses when they are not given (torchvision's ImageNet presets).
DEFAULT_PREPROCESSING = {"train_crop_size": 224, "val_resize_size": 256, "val_crop_size": 224,
                         "interpolation": "bilinear"}
DEFAULT_MODEL = "densenet201"
# What a resumed or --test-only run takes from its checkpoint when the flag is not given: the architecture too
# (a densenet121 run evaluated without --model is a densenet121, as predict.py and export_onnx.py read it).
FROM_CHECKPOINT = {"model": DEFAULT_MODEL, **DEFAULT_PREPROCESSING}


def check_image_sizes(args):
    """The sizes given (None: not given yet, see resolve_from_checkpoint) fit DenseNet and each other."""
    sizes = {flag: getattr(args, flag) for flag in ("train_crop_size", "val_resize_size", "val_crop_size")}
    for name, size in sizes.items():
        if size is not None and size <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {size}")
        if size is not None and name != "val_resize_size" and size < SMALLEST_IMAGE:
            raise UserError(f"--{name.replace('_', '-')} {size} is too small for DenseNet: the smallest it accepts "
                            f"is {SMALLEST_IMAGE}")
    if None not in (args.val_crop_size, args.val_resize_size) and args.val_crop_size > args.val_resize_size:
        raise UserError("--val-crop-size cannot exceed --val-resize-size")


def resolve_from_checkpoint(args, recorded=None):
    """Fill in the flags of FROM_CHECKPOINT not given: from `recorded` (the checkpoint's saved configuration,
    when the run resumes it or evaluates it), else the defaults. Returns {flag: value} of what the checkpoint
    changed from the defaults, for the log. Called once, before the data is built; args is not changed after it."""
    known = {"model": densenet.MODELS, "interpolation": INTERPOLATIONS}  # a value this code cannot use is not taken
    taken = {}
    for name, default in FROM_CHECKPOINT.items():
        if getattr(args, name) is not None:
            continue
        value = (recorded or {}).get(name)
        if value is not None and value != default and (name not in known or value in known[name]):
            taken[name] = value
        setattr(args, name, taken.get(name, default))
    check_image_sizes(args)
    return taken
