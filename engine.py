"""The engine: one epoch of training (train_one_epoch) and an exact evaluation (evaluate), with what they
count, time and print. The step itself is trainer.Trainer.step; when to stop is stop.py, which both loops
consult at every boundary (a step, an evaluation batch) through one small all-reduce started a step ahead.

The step line keeps the Ascend original's MetricLogger layout, so its launchers' greps keep working:
    Epoch: [3]  [10/23]  eta: 0:00:09  lr: 0.019337  img/s: 88.3  loss: 0.4412 (0.5120)  acc1: ...  time: ...
"""
import contextlib
import math
import signal
import threading
import time

import torch
import torch.nn as nn

import data as data_lib
import comm
import utils
from cli import NumericalError, UserError
from stop import FAILED, USER_ERROR, Cause, Interrupted, Stopped
from trainer import learning_rate
from utils import log, warn


# ----------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------

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
        return comm.all_reduce(values) if all_ranks else values

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


class BufferGuard:
    """The model's buffers (BatchNorm running statistics) as they were before the step in flight.

    A collective that fails inside a step (a lost peer) fails in the backward pass, after the forward pass has
    updated them with the step's batch: put back, the saved state is exactly that of the last completed step,
    and a restart from it trains as if nothing had happened."""

    def __init__(self, model):
        self.buffers = list(model.buffers())
        self.copies = [b.detach().clone() for b in self.buffers]

    def save(self):
        torch._foreach_copy_(self.copies, self.buffers)

    def restore(self):
        torch._foreach_copy_(self.buffers, self.copies)


# ----------------------------------------------------------------------------
# Batches: waiting for them, and what ends the wait
# ----------------------------------------------------------------------------

class DataStall(BaseException):
    """The loader delivered nothing for --data-timeout seconds (a BaseException: raised by a timer signal at any
    line, it must not be taken for an unreadable image by an `except Exception` on the way)."""


@contextlib.contextmanager
def data_timeout(seconds, stage):
    """Raise DataStall when the body (fetching a batch) has waited `seconds` of time this process could run.

    A timer signal (SIGALRM), not a watchdog thread: with 0 loader workers the main thread itself is blocked in
    a read() of the stalled file, and only a signal interrupts that. It ticks every TICK_S and each tick counts
    the time since the last one, at most two ticks' worth: a process stopped meanwhile (SIGSTOP, `scontrol
    suspend`, a paused VM) sees one long gap when it resumes, which is not a stall of its loader. Off for 0 and
    outside the main thread (where Python cannot handle signals). Not nested."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return
    tick = min(TICK_S, seconds)
    waited, last = 0.0, time.monotonic()

    def on_tick(signum, frame):
        nonlocal waited, last
        now = time.monotonic()
        waited, last = waited + min(now - last, 2 * tick), now
        if waited >= seconds:
            raise DataStall(f"{stage}: no batch for {seconds:g} s from the data loader (a hung file system? "
                            f"raise --data-timeout)")

    previous = signal.signal(signal.SIGALRM, on_tick)
    signal.setitimer(signal.ITIMER_REAL, tick, tick)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


TICK_S = 1.0


class DataFailure(Exception):
    """The loader cannot deliver: it stalled, or a worker died. str() is one line naming the stage."""


def next_batch(iterator, timeout, stage):
    """next(iterator), or None at its end; a stall or a dead worker (the OOM killer) is a DataFailure."""
    try:
        with data_timeout(timeout, stage):
            return next(iterator, None)
    except DataStall as e:
        raise DataFailure(str(e)) from None
    except (RuntimeError, ConnectionError, EOFError) as e:
        # A dead worker shows up as DataLoader's own RuntimeError, or as a broken pipe to it when the batch it
        # had queued is collected (ConnectionResetError, EOFError).
        if isinstance(e, RuntimeError) and "DataLoader worker" not in str(e):
            raise
        reason = str(e).splitlines()[0].rstrip(". ") if str(e) else type(e).__name__
        raise DataFailure(f"{stage}: a data loading worker died ({reason}); out of memory? try fewer --workers "
                          f"or a smaller --batch-size") from None


class Feed:
    """One pass over a loader. A signal while waiting for a batch, a stalled loader or a dead worker end the
    feed (None from then on); the last two become this rank's stop cause, acted on at the next boundary."""

    def __init__(self, loader, stop, timeout, stage):
        self.iterator = data_lib.batches(loader)
        self.stop, self.timeout = stop, timeout
        self.stage = stage  # batch number -> what the error line calls it
        self.ended = False

    def next(self, number):
        """Batch `number` (counted from 0), or None."""
        if self.ended:
            return None
        try:
            with self.stop.waiting():
                batch = next_batch(self.iterator, self.timeout, self.stage(number))
        except Interrupted:
            if self.stop.phase != "running":
                raise  # nothing to save (--test-only): the process ends now
            batch = None  # the signal is the stop cause already: the ranks stop at the next boundary
        except DataFailure as e:
            self.stop.request(Cause(FAILED, str(e)))
            batch = None
        self.ended = batch is None
        return batch


def smallest_batch(crop_size):
    """The fewest images a rank can train a step on. BatchNorm needs two values per channel: one image is enough
    unless DenseNet's last feature map is 1x1 (crops of 60 px or less), where it needs two. (Stem conv and
    max-pool round up, the three transitions' average pools round down.)"""
    side = math.ceil(math.ceil(crop_size / 2) / 2) // 8  # stem conv and max-pool (ceil), then 2 x 2 x 2 (floor)
    return 2 if side <= 1 else 1


def agree(stop, batch, smallest, where):
    """Start the agreement of the step that trains `batch` (None: this rank has no batch)."""
    images = 0 if batch is None else len(batch.targets)
    return stop.agreement(images, few=images < smallest, where=where)


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------

class Progress:
    """One epoch's bookkeeping: counts, timing, the unreadable files, the step line."""

    def __init__(self, trainer, epoch, start_step, steps, args):
        dev = trainer.device.torch_device
        self.trainer, self.epoch, self.start_step, self.steps, self.args = trainer, epoch, start_step, steps, args
        # With --compile the first step is compilation: never inside the FPS window, even with --warmup-steps 0.
        self.throughput = utils.Throughput(trainer.device, warmup=max(args.warmup_steps, 1) if args.compile else
                                           args.warmup_steps)
        self.meter = Meter(dev)
        self.window = Window()
        self.bad_files = 0
        self.trained = 0
        self.first_step_time = None
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=dev)  # non-finite loss, found without a sync
        self.last_loss = torch.zeros((), device=dev)
        # One clock reading: the first step line's 'time:' IS first_step_time (the perf summary's CompileTime,
        # which the original's launcher greps from that line), not a reading taken a context switch earlier.
        self.start = self.window.start = time.perf_counter()

    def unreadable(self, bad, stop):
        for path, reason in bad:
            warn(f"skipped unreadable image {path} ({reason})")
        self.bad_files += len(bad)
        if self.bad_files > self.args.max_bad_images:
            stop.request(Cause(USER_ERROR, f"more than --max-bad-images {self.args.max_bad_images} unreadable "
                                           f"training images (latest: {bad[-1][0]}); fix the dataset or raise "
                                           f"the limit"))

    def trained_on(self, n, output, loss, targets, step):
        self.trained += 1
        self.first_bad_step.copy_(torch.where(~torch.isfinite(loss) & (self.first_bad_step < 0), step,
                                              self.first_bad_step))
        self.meter.update(loss * n, output, targets)
        self.last_loss = loss

    def counted(self, step, n):
        """After each step: the FPS window, and the step line at the first, every --print-freq and the last."""
        self.throughput.step(n)
        self.window.steps += 1
        self.window.images += n
        if step == self.start_step or (step + 1) % self.args.print_freq == 0 or step + 1 == self.steps:
            check_finite(self.first_bad_step, self.epoch)
            self.trainer.device.synchronize()
            now = time.perf_counter()
            if step == self.start_step:
                self.first_step_time = now - self.start
                if self.args.compile:
                    log(f"Train [{self.epoch}] first step took {self.first_step_time:.1f} s (torch.compile "
                        f"compilation; excluded from FPS)")
            eta = (now - self.start) / (step + 1 - self.start_step) * (self.steps - step - 1)
            log_step(self.epoch, step, self.steps, eta, self.trainer, float(self.last_loss), self.meter.read(),
                     self.window.fields(now))
            self.window = Window()

    def stopped(self, code, step, partial):
        """The Stopped for an agreed stop before `step`, with the sums of the whole epoch so far (all ranks); when
        this attempt has trained nothing yet, there is nothing new to save."""
        check_finite(self.first_bad_step, self.epoch)
        sums = [a + b for a, b in zip(self.meter.sums(all_ranks=True), partial or [0, 0, 0, 0])]
        trained = comm.all_reduce([self.trained], op="max")[0]
        if not trained:
            return Stopped(code, f"at epoch {self.epoch} step {step}", untrained=True)
        return Stopped(code, f"at epoch {self.epoch} step {step}", position=(self.epoch, step), partial=sums)

    def finish(self, partial):
        """The epoch's record for metrics.jsonl, and its closing lines."""
        check_finite(self.first_bad_step, self.epoch)
        elapsed = time.perf_counter() - self.start
        this_attempt = self.meter.sums(all_ranks=True)
        fps, epoch_fps = report_throughput(self.throughput, self.epoch, self.args.synthetic, elapsed, this_attempt[3])
        loss_mean, acc1, acc5, seen = averages([a + b for a, b in zip(this_attempt, partial or [0, 0, 0, 0])])
        n_bad = int(comm.all_reduce([self.bad_files])[0])
        resumed = "" if not self.start_step else f" (the epoch was resumed at step {self.start_step + 1}: " + (
            f"{seen} images in all)" if partial else "the earlier attempt's metrics were not saved)")
        log(f"Train [{self.epoch}] done in {utils.format_eta(elapsed)}: train loss {loss_mean:.4f}  acc1 {acc1:.3f}"
            f"  images {int(this_attempt[3])}{resumed}  unreadable images {n_bad}")
        amp = self.trainer.amp
        if amp.scaler is not None and int(amp.skipped_steps):
            log(f"Train [{self.epoch}] {int(amp.skipped_steps)} steps skipped so far for fp16 gradient overflow "
                f"(loss scale now {amp.current_scale():g})")
        record = {"lr": self.trainer.optimizer.param_groups[0]["lr"], "train_loss": loss_mean, "train_acc1": acc1,
                  "train_acc5": acc5, "fps": fps, "epoch_fps": epoch_fps, "epoch_time": elapsed, "images": seen,
                  "unreadable_images": n_bad, "last_loss": float(self.last_loss),
                  "first_step_time": self.first_step_time, "steps": self.steps}
        if self.start_step:
            record["resumed"] = True  # and, when `partial` was saved, the metrics cover both attempts
        return record


def train_one_epoch(trainer, loader, epoch, start_step, steps, args, stop, partial=None):
    """Steps start_step..steps-1 of `epoch`; the epoch's metrics record (with `partial`, the sums of an earlier,
    interrupted attempt at it). Raises stop.Stopped at the step boundary where the ranks agreed to stop, and
    comm.PeerLost when a collective failed (the model then holds the last completed step)."""
    trainer.model.train()
    steps = min(steps, args.max_steps or math.inf)
    progress = Progress(trainer, epoch, start_step, steps, args)
    feed = Feed(loader, stop, args.data_timeout, lambda k: f"training data (epoch {epoch}, step {k + 1})")
    guard = BufferGuard(trainer.model_without_ddp) if comm.is_dist() else None
    smallest = smallest_batch(args.train_crop_size)
    batch = feed.next(start_step)
    agreed = agree(stop, batch, smallest, f"epoch {epoch} step {start_step}")
    progress.window.data_time += time.perf_counter() - progress.start
    done = start_step  # steps done: a step whose collective failed is not (its buffers are put back)
    try:
        for step in range(start_step, steps):
            agreement = agreed()
            if agreement.code is not None:
                raise progress.stopped(agreement.code, step, partial)
            fetch_start = time.perf_counter()
            following = feed.next(step + 1) if step + 1 < steps else None
            agreed = agree(stop, following, smallest, f"epoch {epoch} step {step + 1}") if step + 1 < steps else None
            progress.window.data_time += time.perf_counter() - fetch_start
            n = train_step(trainer, batch, agreement, progress, guard, stop, epoch + step / progress.steps, step)
            done = step + 1
            progress.counted(step, n)
            batch = following
        return progress.finish(partial)
    except comm.PeerLost as lost:
        lost.position = (epoch, done)
        raise


def train_step(trainer, batch, agreement, progress, guard, stop, epoch_progress, step):
    """One step of the epoch loop on `batch` (None: this rank has none); the images it trained on."""
    if batch is not None and batch.bad:
        progress.unreadable(batch.bad, stop)
    n = 0 if batch is None else len(batch.targets)
    if agreement.skip:
        if n == 1:  # (a batch of 0 readable images has had its files named already)
            warn(f"epoch {progress.epoch} step {step + 1}: skipped a batch of 1 readable image (training needs 2)")
        return 0
    args = progress.args
    if guard is not None:
        guard.save()
    try:
        # weight: this rank's share of the global batch, so that DDP's mean over the ranks is the mean over all
        # images when the ranks' batches differ (an epoch's last step); exactly 1 when they are equal.
        output, loss, targets = trainer.step(batch.images, batch.targets, learning_rate(args, epoch_progress),
                                             update_ema=(step + 1) % args.model_ema_steps == 0,
                                             ema_warmup=progress.epoch < args.lr_warmup_epochs,
                                             weight=n * comm.get_world_size() / agreement.images)
    except RuntimeError as e:
        if guard is None or not comm.is_peer_failure(e):
            raise
        guard.restore()
        raise comm.lost_peer(e, f"epoch {progress.epoch} step {step}") from None  # (steps done, as everywhere)
    progress.trained_on(n, output, loss, targets, step)
    return n


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
    epoch_fps = images_epoch / max(comm.all_reduce([elapsed], op="max")[0], 1e-9)
    if throughput.finish() is None:
        log(f"Train [{epoch}] FPS: {epoch_fps:.2f} img/s over the whole epoch, warm-up included (fewer than "
            f"{throughput.warmup + 1} steps, so no steady-state figure; lower --warmup-steps)")
        return None, epoch_fps
    images_all = comm.all_reduce([throughput.images])[0]
    window = comm.all_reduce([throughput.end - throughput.start], op="max")[0]
    fps = images_all / window
    log(f"Train [{epoch}] FPS: {fps:.2f} img/s (steady state: steps {throughput.first_step}-{throughput.steps} "
        f"of {throughput.steps}, {int(images_all)} images in {window:.2f} s, all ranks, data loading "
        f"{'excluded (synthetic)' if synthetic else 'included'})")
    return fps, epoch_fps


def check_finite(first_bad_step, epoch):
    """NumericalError on every rank when the loss went non-finite on any (one small collective): the ranks stop
    together, and nothing is written over the last good checkpoint."""
    step = comm.all_reduce([int(first_bad_step)], op="max")[0]
    if step >= 0:
        # step + 1: counted from 1, like the log's [step/N] lines.
        raise NumericalError(f"non-finite loss at epoch {epoch} step {int(step) + 1}; stopped without overwriting "
                             f"the last good checkpoint (try a lower --lr, --clip-grad-norm, or fp32)")


# ----------------------------------------------------------------------------
# Evaluation: exact over the whole validation set
# ----------------------------------------------------------------------------

def evaluate_all(trainer, loader, args, stop, epoch=None):
    """The model's validation metrics, then the EMA's as ema_*; {} without a validation set."""
    if loader is None:
        return {}
    stats = evaluate(trainer.model_without_ddp, loader, trainer, args, stop, epoch=epoch)
    if trainer.ema is not None:
        ema = evaluate(trainer.ema.module, loader, trainer, args, stop, "EMA ", epoch=epoch)
        stats.update({f"ema_{k}": v for k, v in ema.items()})
    return stats


@torch.no_grad()
def evaluate(model, loader, trainer, args, stop, log_prefix="", epoch=None):
    """Loss, Acc@1 and Acc@5 over the whole validation set: every image counted once, summed over ranks.
    Raises stop.Stopped between batches when the ranks agree to stop (nothing to save: the epoch's training
    is on disk before its evaluation starts)."""
    model.eval()
    meter = Meter(trainer.device.torch_device)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    steps = data_lib.eval_steps(loader)  # the same on every rank: the boundaries where they agree
    what = "the evaluation" + (f" of epoch {epoch}" if epoch is not None else "")
    feed = Feed(loader, stop, args.data_timeout, lambda k: f"validation data (batch {k + 1} of {steps})")
    start, n_bad = time.perf_counter(), 0
    batch = feed.next(0)
    agreed = agree(stop, batch, 0, what)
    for step in range(steps):
        agreement = agreed()
        if agreement.code is not None:
            raise Stopped(agreement.code, f"during {what}", then=" (it evaluates that epoch first)", evaluating=True)
        following = feed.next(step + 1) if step + 1 < steps else None
        agreed = agree(stop, following, 0, what) if step + 1 < steps else None
        for path, reason in batch.bad if batch is not None else ():
            warn(f"skipped unreadable validation image {path} ({reason})")
        n_bad += len(batch.bad) if batch is not None else 0
        if batch is not None and len(batch.targets):
            images = trainer.normalize(batch.images)
            targets = batch.targets.to(trainer.device.torch_device, non_blocking=True)
            with trainer.amp.autocast():
                output = model(images)
            meter.update(criterion(output.float(), targets), output, targets)
        if (step + 1) % args.print_freq == 0:
            log(f"Test: {log_prefix}[{step + 1}/{steps}]")
        batch = following
    return eval_results(meter, n_bad, start, log_prefix, args)


def eval_results(meter, n_bad, start, log_prefix, args):
    loss, acc1, acc5, n = meter.read(all_ranks=True)
    n_bad = int(comm.all_reduce([n_bad])[0])
    if n == 0:  # an Acc@1 of 0.000 "on 0 images" would look like a result
        raise UserError(f"evaluation covered 0 images ({n_bad} unreadable): check the validation images of "
                        f"{args.data_path}")
    log(f"Test: {log_prefix}loss {loss:.4f}, {n} images in {time.perf_counter() - start:.1f} s")
    log(f" * {log_prefix}Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} ({n} images"
        + (f", {n_bad} unreadable skipped)" if n_bad else ")"))
    return {"acc1": acc1, "acc5": acc5, "loss": loss, "images": n, "time": time.perf_counter() - start}
