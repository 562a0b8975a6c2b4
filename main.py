"""Train and evaluate DenseNet on an ImageNet-layout folder, on one device or many.

    python main.py --data-path /data/imagenet                      # whatever device is here
    torchrun --nproc_per_node 8 main.py --data-path ... -b 1024    # DDP; -b is the global batch

Reads top to bottom: run() (the entry point: one line for a known failure, one exit code), main() (the
backbone: configure, set up, build, resume, then evaluate or train), train() (the epoch loop), and the few
steps they take that have no other home. Each concern lives in a module of its own:

    config.py      the command line and the checks that need nothing but the arguments
    launch.py      where this process sits in its job (torchrun, srun, RANK_ID); comm.py: the other ranks
    rundir.py      the run's folder: where it is, its lock, metrics.jsonl, run.json
    data.py        loaders (layout.py: the data set's layout)          trainer.py  the training step
    engine.py      train_one_epoch, evaluate                           checkpoint.py  checkpoints, resuming
    stop.py        the stop protocol: every way a run ends             device.py  NPU / GPU / CPU
    lifecycle.py   output streams, the rank log, exits                 weights.py  reading weight files
"""
import os
import signal
import sys


def interrupted_at_start(signum, frame):
    """Ctrl-C (or a SIGTERM) during the imports below, which take seconds: one line, not a traceback."""
    os.write(2, f"stopped by {signal.Signals(signum).name} during start-up (nothing to save)\n".encode())
    os._exit(128 + signum)


if __name__ == "__main__":  # only as a program: importing main (the tests) changes no handler
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, interrupted_at_start)

import functools  # noqa: E402
import hashlib  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import cli  # noqa: E402
cli.check_torchvision()  # before `import data`: a torchvision built for another torch is one line, not a traceback

import checkpoint  # noqa: E402
import config  # noqa: E402
import data as data_lib  # noqa: E402
import device as device_lib  # noqa: E402
import comm  # noqa: E402
import engine  # noqa: E402
import launch  # noqa: E402
import layout  # noqa: E402
import lifecycle  # noqa: E402
import rundir  # noqa: E402
import utils  # noqa: E402
from checkpoint import Position  # noqa: E402
from cli import UserError, run_tool  # noqa: E402
from config import get_args_parser  # noqa: E402,F401  (main.get_args_parser: the original's entry point name)
from stop import DONE, FAILED, Interrupted, Stop, Stopped  # noqa: E402
from trainer import build_trainer  # noqa: E402
from utils import log  # noqa: E402


def main(args, stop=None):
    """The run: configure, set up, build, resume, then evaluate (--test-only) or train. Returns the exit code.
    `stop`: the Stop that run() installed before anything else (one is made here when called on its own)."""
    stop = stop or Stop()
    stop.doing = "set-up"
    job = launch.job_of(args)
    config.validate_args(args, job.world_size)
    stop.doing = "the dataset scan"
    found_layout = preflight(args, job)
    stop.doing = "joining the process group"
    run = launch.setup(args, job, log=log)
    utils.seed_everything(args.seed + run.rank)
    comm.record_peers()  # every rank's host and pid: a rank that dies can be named
    stop.doing = "resume"
    found = checkpoint.read_resume_checkpoint(run.resume, args.output_dir)
    taken = config.resolve_from_checkpoint(args, found.config if found else None)  # (only those not the defaults)
    amp = device_lib.build_mixed_precision(args, run.device)  # before any data is read: a missing apex fails fast
    log(f"Device: {run.device.describe()}; world size {run.world_size}; "
        + (f"global batch {args.batch_size} = {run.world_size} x {run.local_batch}" if run.distributed
           else f"batch {args.batch_size}") + f"; workers {run.workers} per process ({run.workers_from})")
    if launch.restart_count():
        log(f"Attempt {launch.restart_count() + 1}: the launcher started this job again; it resumes by itself")
    if taken:
        log(f"From {found.path} (the flags were not given): "
            + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in taken.items()))
    stop.doing = "the dataset scan"
    data = data_lib.build(args, run, found_layout)
    num_classes = args.num_classes or len(data.classes)
    comm.check_ranks_agree(ranks_must_agree(args, run, amp, data, num_classes))
    stop.doing = "the model build"
    trainer = build_trainer(args, run.device, num_classes, amp, channels_last=run.channels_last,
                            distributed=run.distributed, local_batch=run.local_batch, world_size=run.world_size,
                            log=log)
    log_model(args, trainer, num_classes, run, amp)
    start = checkpoint.resume(args, found, trainer, data.classes, run.rank, run.world_size,
                              data.order(args.seed), log=log)
    if args.test_only:
        if data.val_loader is None:
            raise UserError("--test-only needs a dataset (not --synthetic)")
        stop.doing = "evaluation"
        engine.evaluate_all(trainer, data.val_loader, args, stop)
        return DONE
    if start.epoch >= args.epochs and start.pending is None:
        log(f"Nothing to train: {start.path or 'the run'} has finished all {start.epoch} epochs "
            f"(--epochs {args.epochs}); to train on, resume it with a larger --epochs")
        return DONE
    rundir.claim(args.output_dir, args.resume, args.overwrite, resuming=start.path is not None)
    rundir.write_run_description(args.output_dir, describe_run(args, run, amp))
    log(f"Start training: epochs {start.epoch}..{args.epochs - 1}, lr {args.lr} ({args.lr_scheduler}, "
        f"updated every {args.lr_update})")
    return train(args, run, data, trainer, start, stop)


def train(args, run, data, trainer, start, stop):
    """The epoch loop: train the epoch, save its training, evaluate it, commit it (metrics row, checkpoint,
    best). Every way out goes through the stop protocol (stop.py)."""
    record = rundir.RunRecord(args.output_dir, start.best_acc1, tensorboard=args.tensorboard)
    saver = Saver(args, trainer, data, record, start.classes)
    try:
        with stop.running():
            if start.pending is not None:  # stopped during that epoch's evaluation: evaluate it before going on
                log(f"Epoch {start.epoch - 1} was trained but not evaluated: evaluating it first")
                finish_epoch(saver, stop, start.epoch - 1, start.pending)
            for epoch in range(start.epoch, args.epochs):
                first = epoch == start.epoch
                stats = train_epoch(args, data, trainer, stop, epoch, start if first else None)
                with comm.collective(f"the end of epoch {epoch}", position=(epoch, stats["steps"])):
                    trainer.sync_buffers()  # every rank evaluates, and rank 0 saves, the same BatchNorm statistics
                with stop.saving():  # the epoch's training is on disk before its evaluation starts
                    saver.save((epoch + 1, 0), pending=stats)
                stop.agree_now(f"at the end of epoch {epoch}", then=f" (it evaluates epoch {epoch} first)")
                finish_epoch(saver, stop, epoch, stats)
                if epoch + 1 < args.epochs:
                    log(f"Run: {args.epochs - epoch - 1} epochs left, about {record.eta(args.epochs - epoch - 1)} "
                        f"to go (evaluation included)")
    except Stopped as stopped:
        return stop.conclude(stopped, saver)
    except comm.PeerLost as lost:
        return stop.survive(lost, saver, run.device)
    record.close()
    return DONE


def train_epoch(args, data, trainer, stop, epoch, start=None):
    """One epoch of training from its first step, or from where `start` (a ResumePoint) says it stopped."""
    start_step = start.step if start is not None else 0
    if data.train_sampler is not None:  # the epoch's order after the samples already trained on
        data.train_sampler.set_epoch(epoch, start_step * args.batch_size, start.order_seed if start else None)
    if start is not None and start.rng is not None:
        utils.set_rng_state(start.rng, trainer.device)  # continue the random streams exactly where they were
    # Steps per epoch from the global batch: the same on any number of ranks (ceil(N / B)).
    steps = len(data.train_loader) if data.train_sampler is None else \
        -(-data.train_sampler.epoch_length() // args.batch_size)
    return engine.train_one_epoch(trainer, data.train_loader, epoch, start_step, steps, args, stop,
                                  start.partial if start is not None else None)


def finish_epoch(saver, stop, epoch, train_stats):
    """Evaluate a trained epoch, then commit it: its checkpoint (marked evaluated), model_best.pth when it is the
    best, model_<epoch>.pth with --keep-checkpoints, and its metrics.jsonl row, written in an order that leaves
    the previous commit intact whenever it is interrupted (checkpoint.save_checkpoints)."""
    val_stats = engine.evaluate_all(saver.trainer, saver.data.val_loader, saver.args, stop, epoch=epoch)
    is_best = saver.record.add(epoch, train_stats, val_stats)
    with stop.saving():
        saver.save((epoch + 1, 0), epoch_end=epoch, is_best=is_best)
    stop.agree_now(f"at the end of epoch {epoch}")


@dataclass
class Saver:
    """How this run writes where it stands (for the epoch loop and stop.py): the trainer's state at a position
    as checkpoint.pth, on rank 0, then a barrier (comm.rank0_writes): no rank goes on before it is on disk."""
    args: object
    trainer: object
    data: object
    record: object
    classes: list

    @property
    def output_dir(self):
        return self.args.output_dir

    @property
    def path(self):
        return os.path.join(self.args.output_dir, "checkpoint.pth")

    def holds(self, at):
        """Whether checkpoint.pth holds the state after `at` already (another survivor saved it)."""
        return checkpoint.saved_position(self.path)[:2] == tuple(at)

    def save(self, at, partial=None, pending=None, epoch_end=None, is_best=False, writer=False):
        """The state after `at` = (epoch, steps done); pending: the train metrics of an epoch saved before its
        evaluation; epoch_end: the epoch whose evaluation this save commits (with its metrics row); writer: this
        rank writes alone, without a barrier (a survivor after a lost peer)."""
        sampler = self.data.train_sampler
        order = self.data.order(sampler.order_seed if sampler is not None else self.args.seed)
        position = Position(at[0], at[1], evaluated=pending is None, order=order)
        state = checkpoint.training_state(self.trainer, self.args, position, self.record.best_acc1, self.classes,
                                          pending=pending, partial=partial, all_ranks=not writer)
        row = self.record.write_row if epoch_end is not None else None

        def write():
            checkpoint.save_checkpoints(state, self.args.output_dir, epoch=epoch_end, is_best=is_best,
                                        keep=self.args.keep_checkpoints, before_commit=row, writer=writer or None)
        if writer:
            write()
        else:
            comm.rank0_writes(write, self.path, where=f"epoch {at[0]} step {at[1]}")


def preflight(args, job):
    """What the file system can tell before any work: files that must exist, the data set's layout (returned,
    so that it is scanned once), and the output folder, which rank 0 resolves, checks and locks here (a busy
    folder costs nothing). One line."""
    rank0 = job.rank == 0
    if args.resume not in ("", "auto") and rank0:  # only rank 0 reads it (and sends it on)
        if os.path.isdir(args.resume):
            raise UserError(f"--resume {args.resume} is a directory: to continue the run in it pass --resume auto "
                            f"--output-dir {args.resume}, or give its checkpoint file "
                            f"({os.path.join(args.resume, 'checkpoint.pth')})")
        if not os.path.isfile(args.resume):
            raise UserError(f"--resume {args.resume}: no such file")
    if args.pretrained_weight_path and not os.path.isfile(args.pretrained_weight_path):
        raise UserError(f"--pretrained_weight_path {args.pretrained_weight_path}: no such file")
    if args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    data_layout = None if args.synthetic else layout.find_layout(args.data_path)
    classes = data_layout.classes if data_layout else []
    if data_layout and args.num_classes is not None and args.num_classes < len(classes):
        raise UserError(f"--num_classes {args.num_classes} is smaller than the {len(classes)} class folders "
                        f"in {args.data_path}/train; drop it or give at least {len(classes)}")
    # From here on args.output_dir is the run's folder (never changed again; the other ranks get rank 0's).
    given = args.output_dir is not None
    model = args.model or config.DEFAULT_MODEL  # (the checkpoint's, when not given, is known only after this)
    args.output_dir, where = rundir.resolve_output_dir(args.output_dir, model, args.resume == "auto", rank0)
    found = where is not None and os.path.isdir(args.output_dir)
    if rank0 and not given and args.test_only and args.resume == "auto" and not found:
        raise UserError(f"--test-only --resume auto: no {model} run with a checkpoint under "
                        f"{rundir.DEFAULT_OUTPUT_ROOT}; give --output-dir DIR or --resume FILE")
    if where and (found or not args.test_only):
        print(where, flush=True)
    if rank0:
        rundir.prepare_output_dir(args.output_dir, args.overwrite, args.resume, args.test_only,
                                  launch.restart_count() > 0)
    return data_layout


def ranks_must_agree(args, run, amp, data, num_classes):
    """What every rank of a job must agree on, by the name the user knows it (for comm.check_ranks_agree):
    ranks launched by hand can differ in flags or data, and would then fail inside DDP, hang in a collective
    (different step counts) or train on silently (a different --batch-size)."""
    images = None if args.synthetic else (len(data.train_loader.dataset), len(data.val_loader.dataset))
    return {"the world size": run.world_size, "--model": args.model, "--batch-size": args.batch_size,
            "the number of classes": num_classes,
            "the class names (digest)": hashlib.sha256("\n".join(data.classes).encode("utf-8", "surrogateescape"))
            .hexdigest()[:12],
            "the train/val image counts": images, "--epochs": args.epochs, "--max-steps": args.max_steps,
            "--seed": args.seed, "--lr": args.lr, "--lr-scheduler": args.lr_scheduler,
            "--ra-sampler": (args.ra_sampler, args.ra_reps), "--model-ema": args.model_ema,
            "the precision": amp.describe().split("; ")[0]}


def log_model(args, trainer, num_classes, run, amp):
    log(f"Model: {args.model}, {num_classes} classes, "
        f"{sum(p.numel() for p in trainer.model_without_ddp.parameters()) / 1e6:.1f}M parameters; "
        f"{'channels_last' if run.channels_last else 'NCHW'}; precision: {amp.describe()}")
    if trainer.ema is not None:
        log(f"Model EMA: decay {trainer.ema.decay:.6f} every {args.model_ema_steps} steps (from --model-ema-decay "
            f"{args.model_ema_decay} adjusted for this batch and length)")


def describe_run(args, run, amp):
    """run.json: what the launchers' summary reports besides metrics.jsonl, and what tells runs apart."""
    return {"model": args.model, "network": f"DenseNet{args.model[len('densenet'):]}_for_PyTorch",
            "world_size": run.world_size, "batch_size": args.batch_size, "local_batch": run.local_batch,
            "device": run.device.type, "device_name": run.device.describe(), "precision": amp.describe(),
            "epochs": args.epochs, "synthetic": args.synthetic,
            "data_path": os.path.abspath(args.data_path) if args.data_path else None,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def open_log_file(args):
    """--log-file: everything this process writes to its stdout and stderr goes to this file too ({rank} becomes
    the global rank), native libraries' output included, as the original's `> train_$RANK_ID.log 2>&1`."""
    path = args.log_file.replace("{rank}", str(launch.job_of(args).rank))
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        lifecycle.capture_output(path)
    except OSError as e:
        raise UserError(f"--log-file {path}: cannot write there ({e.strerror or e})") from None


def run(argv=None):
    """Entry point: known failures become one line on stderr and an exit code from stop.py's table, and every
    way out ends within seconds: no exit waits for the loader's workers or a terminal (lifecycle.py)."""
    args = get_args_parser().parse_args(argv)
    lifecycle.guard_streams()  # a closed, full or stopped stdout must neither end nor block the run
    stop = Stop()  # from the start: a signal during the set-up stops at once, in one line
    code = FAILED
    try:
        error = run_tool(open_log_file, args) if args.log_file else None
        lifecycle.enable_faulthandler()  # after the capture: a crash's traceback lands in the rank's log
        code = error or run_tool(functools.partial(main, stop=stop), args)
    except Interrupted as e:
        where = e.where or stop.doing
        print(f"stopped by {e.signal_name}" + (f" during {where}" if where else "") + " (nothing to save)",
              file=sys.stderr, flush=True)
        code = 128 + e.signum
    except comm.PeerLost as e:  # outside the epoch loop (set-up, --test-only): nothing to save
        print(f"error: {e}", file=sys.stderr, flush=True)
    except Exception:
        traceback.print_exc()  # a bug or an unexpected failure: the full traceback, into the --log-file too
    finally:
        lifecycle.stop_children()
        lifecycle.close_output()  # what is queued for the terminal, for a few seconds at most
        if comm.is_dist():
            if code:  # a failing rank must not leave its peers waiting in a collective: torchrun stops them
                os._exit(code)
            comm.cleanup_distributed()
        stop.restore()  # (for callers in this process: tests)
    return code


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    exit_code = run()
    # Everything is written, synced and flushed by now (run() closed the output); the interpreter's own teardown
    # of torch would only add about a second to every exit, the launchers' and schedulers' included.
    os._exit(exit_code)
