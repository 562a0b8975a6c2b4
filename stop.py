"""The stop protocol: every way a run ends, decided in one place.

A run stops for one of these causes: a signal (SIGTERM, SIGINT, SIGHUP, or the preemption notices SIGUSR1 and
SIGUSR2; from a person, a scheduler, or srun/torchrun passing one on), a data loader that died or stalled, too
many unreadable images, a non-finite loss, a lost peer -- or the end of the work. Whatever the cause, and
whichever rank it reaches, the ranks go through the same states:

    SETUP ------- a signal -----------------------------------------------> exit 128+n, one line, nothing saved
      | running()  (training, evaluation; saving() around each save)
      v
    RUNNING ----- a cause on some rank: recorded only -----> REQUESTED (that rank)
      |  ^                                                       | at the next boundary (a step, an evaluation
      |  +-------- no rank asks ------- agreement <--------------+ batch, the end of an epoch): one all-reduce
      |                                     | some rank asks
      |                                     v
      |                                 STOPPING, every rank at the same boundary
      |                                     | the loss finite on every rank? else exit 3, nothing written
      |                                     v
      |                                 SAVING (saving()): rank 0 writes what it owes -- the checkpoint of the
      |                                     | step reached; nothing when the epoch's training is on disk already
      |                                     | or this attempt trained nothing -- while signals are only recorded
      |                                     v
      |                                 SAVED: a barrier; no rank exits before the file is durable, so srun's
      |                                     | --kill-on-bad-exit and torchrun, which stop the job when the first
      |                                     | task exits, can no longer interrupt the save
      v                                     v
    DONE (0) -----------------------> EXIT with the most serious cause's code (the table below), one line per rank

    A collective fails (a lost peer): no agreement is possible. On gloo the survivors take turns at the output
    folder's lock, the lowest first, and the first to hold it saves the step reached (rank 0 when it survived: it
    holds the lock already); on NCCL/HCCL the communicators are aborted and nothing mid-epoch is saved (a step in
    flight on the device cannot be told complete or not). Exit 1.
    A second signal more than DUPLICATE_WINDOW_S after the first, before SAVING: exit at once, without saving.
"""
import contextlib
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import cli
import device as device_lib
import comm
import lifecycle
import rundir
from utils import log

# The exit codes of a training process, in one table (the launchers and schedulers read them). The values live in
# cli.py, which the tools share and which imports no torch.
DONE = 0
FAILED = cli.EXIT_FAILED             # a failure the run survived (dead or stalled loader, lost peer): resume
USER_ERROR = cli.EXIT_USER_ERROR     # bad input: arguments, files, data set, device (cli.UserError)
NUMERICAL = cli.EXIT_NUMERICAL_ERROR  # a non-finite loss: nothing written over the last good checkpoint
PREEMPTED = cli.EXIT_PREEMPTED       # EX_TEMPFAIL: stopped by a signal with the checkpoint saved; resume
# (And 128 + the signal's number: stopped by a signal where there was nothing to save.)

# Which cause wins when ranks stop for different ones: the one that needs the user's attention most.
SEVERITY = (USER_ERROR, FAILED, PREEMPTED)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
# A second signal this soon after the first is the same request delivered twice, not a second request: a
# scheduler that signals every process of a job (scancel, a Kubernetes pod's SIGTERM) reaches the ranks
# directly AND through torchrun or a launcher, which forward it. A person's second Ctrl-C comes later.
DUPLICATE_WINDOW_S = 1.0


class Interrupted(BaseException):
    """A stop signal where there is nothing to save: the process ends now, in one line. A BaseException, as
    KeyboardInterrupt: a handler raises it at any line, and an `except Exception` on the way (an "unreadable
    image" handler) must not swallow it."""

    def __init__(self, signum, where=None):
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.where = where
        super().__init__(f"stopped by {self.signal_name}" + (f" during {where}" if where else ""))


@dataclass(frozen=True)
class Cause:
    """Why a rank asks to stop: its exit code and one line."""
    code: int
    reason: str


class Stopped(Exception):
    """The ranks agreed to stop at a boundary. where: "at epoch 2 step 141", "during the evaluation of epoch 2",
    ...; position: (epoch, steps done) when the state at that boundary is not on disk yet (the save it owes),
    with partial, the epoch's metric sums so far (all ranks); then: what a resumed run does first (for the
    log)."""

    def __init__(self, code, where, position=None, partial=None, then="", evaluating=False, untrained=False):
        super().__init__(where)
        self.code, self.where, self.position, self.partial, self.then = code, where, position, partial, then
        self.evaluating = evaluating  # stopped during an evaluation: the epoch's training is what is on disk
        self.untrained = untrained    # stopped before this attempt trained a step: nothing new to save


class Stop:
    """This process's side of the protocol: the signal handlers and its own cause. One per process, installed
    before the set-up (main.run), so a signal during the imports' aftermath or the data scan is one line."""

    def __init__(self):
        self.cause: Optional[Cause] = None
        self.phase = "setup"      # "setup" | "running" | "saving"
        self.doing = None         # what the set-up is doing, for the one line a signal then ends it with
        self._first_signal_at = None
        self._signum = None
        self._waiting = 0
        self._previous = {}
        for signum in STOP_SIGNALS:
            previous = signal.getsignal(signum)
            if signum == signal.SIGHUP and previous == signal.SIG_IGN:
                continue  # started under nohup: the user asked for the run to survive a closed terminal
            self._previous[signum] = previous
            signal.signal(signum, self._handle)

    # -- causes --------------------------------------------------------------
    def request(self, cause):
        """Record a cause; the most serious one a rank has seen is the one it brings to the agreement."""
        if self.cause is None or SEVERITY.index(cause.code) < SEVERITY.index(self.cause.code):
            self.cause = cause

    @property
    def requested(self):
        return self.cause is not None

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.phase == "setup":
            if self._first_signal_at is not None:
                return  # already on its way out (a scheduler's signal and a launcher's copy of it)
            self._first_signal_at, self._signum = time.monotonic(), signum
            raise Interrupted(signum, self.doing)
        if self._first_signal_at is not None and self.phase == "running":
            if time.monotonic() - self._first_signal_at >= DUPLICATE_WINDOW_S:
                lifecycle.exit_now(f"second {name}: exiting now without saving", 128 + signum)
            return  # the same request delivered twice (see DUPLICATE_WINDOW_S)
        if self._first_signal_at is None:
            self._first_signal_at = time.monotonic()
            self._signum = signum
        self.request(Cause(PREEMPTED, name))
        if self._waiting and self.phase == "running":
            raise Interrupted(signum)  # a rank blocked on a hung file must not wait for its batch

    # -- phases --------------------------------------------------------------
    @contextlib.contextmanager
    def running(self):
        """Training and evaluation: a first signal is recorded and acted on at the next boundary."""
        previous, self.phase = self.phase, "running"
        try:
            yield self
        finally:
            self.phase = previous

    @contextlib.contextmanager
    def saving(self):
        """A save and the barrier after it: every signal is only recorded, so nothing interrupts the write."""
        previous, self.phase = self.phase, "saving"
        try:
            yield self
        finally:
            self.phase = previous

    @contextlib.contextmanager
    def waiting(self):
        """Around fetching a batch: a signal now raises Interrupted (no step is in flight), as does one recorded
        just before (the caller reports it at the next boundary)."""
        self._waiting += 1  # before the check: a signal between the two lines raises in the handler
        try:
            if self._first_signal_at is not None and self.phase == "running":
                raise Interrupted(self._signum)
            yield self
        finally:
            self._waiting -= 1

    def restore(self):
        """Put back the handlers that were there before (in-process tests)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    # -- boundaries ----------------------------------------------------------
    def agreement(self, images, few=False, where="a step boundary"):
        """Start this boundary's agreement now (a step ahead of its use, so that it runs while the step before
        computes) and return a function that waits for it: Agreed. `images`: what this rank brings to the step;
        few: too few to train on (the ranks then skip the step together); where: the boundary, for the line
        that a lost peer becomes."""
        mine = self.cause.code if self.cause else None
        return comm.sum_async([int(few), images, *(int(mine == code) for code in SEVERITY)], Agreed.of, where)

    def agree_now(self, where, then=""):
        """A boundary with nothing to train or save (an epoch's end): raise Stopped if any rank asks."""
        agreed = self.agreement(0, where=where.removeprefix("at "))()
        if agreed.code is not None:
            raise Stopped(agreed.code, where, then=then)

    # -- the end -------------------------------------------------------------
    def conclude(self, stopped, saver):
        """The ranks agreed to stop (Stopped, on every rank at the same boundary): save what is owed, wait until
        it is durable on every rank, say why on each rank, and return the exit code."""
        causes = comm.gather_all(self.cause)
        with self.saving():
            if stopped.position is not None:
                saver.save(stopped.position, stopped.partial)  # collective, ends with a barrier
        if stopped.untrained:
            saved = "nothing trained yet in this attempt, nothing saved"
        elif stopped.evaluating:
            saved = f"the epoch's training is saved in {saver.path}"
        else:
            saved = f"checkpoint saved to {saver.path}"
        signals = sorted({c.reason for c in causes if c is not None and c.code == PREEMPTED})
        resume = "" if stopped.untrained else f"; resume with --resume auto{stopped.then}"
        if stopped.code == PREEMPTED:
            by = "/".join(signals) + ("" if self.cause is not None else f" (to {describe_causes(causes)})")
            log(f"Preempted by {by} {stopped.where}: {saved}{resume}")
        elif self.cause is not None and self.cause.code == stopped.code:
            print(f"error: {self.cause.reason}; stopped {stopped.where}, {saved}{resume}", file=sys.stderr,
                  flush=True)
        else:
            print(f"Stopped {stopped.where} with the other ranks ({describe_causes(causes)}); rank 0 {saved}",
                  flush=True)
        return stopped.code

    def survive(self, lost, saver, device):
        """A collective failed (comm.PeerLost): no agreement is possible any more. Abort the device's
        collectives (NCCL/HCCL), then on gloo let the survivor whose turn it is save the step reached
        (rundir.survivor_turn: rank 0 when it survived, else the lowest survivor that sees the folder); exit 1
        with one line on each rank."""
        if device_lib.abort_collectives(device):
            outcome = ("the step in flight on the device cannot be told complete, so nothing mid-epoch is saved: "
                       "resume from the last checkpoint with --resume auto")
        elif lost.position is None:  # lost outside a training step: the epoch's training is saved already
            outcome = "resume from the last checkpoint with --resume auto"
        else:
            epoch, step = lost.position
            outcome = f"stopped at epoch {epoch} step {step}; the surviving rank that holds the output folder's " \
                      f"lock saves the checkpoint"
            with self.saving():
                if rundir.survivor_turn(saver.output_dir, comm.get_rank()) and not saver.holds(lost.position):
                    saver.save(lost.position, writer=True)
                    outcome = f"stopped at epoch {epoch} step {step}, checkpoint saved to {saver.path}: resume " \
                              f"with --resume auto"
        print(f"error: {lost}; {outcome}", file=sys.stderr, flush=True)
        return FAILED


@dataclass(frozen=True)
class Agreed:
    """What the ranks agreed at a boundary: skip the step (some rank has too few images to train on, and DDP
    pairs the ranks' all-reduces, so all skip together), the images all ranks bring (each rank's loss is
    weighted by its share of them), and the exit code when some rank asks to stop (None: carry on)."""
    skip: bool
    images: int
    code: Optional[int]

    @staticmethod
    def of(sums):
        few, images, *asked = (int(x) for x in sums)
        code = next((c for c, n in zip(SEVERITY, asked) if n), None)
        return Agreed(skip=few > 0, images=images, code=code)


def describe_causes(causes):
    """'rank 1: SIGTERM; rank 0: ...' for the ranks that asked to stop (a gathered list, None for the others)."""
    return "; ".join(f"rank {r}: {c.reason}" for r, c in enumerate(causes) if c is not None) or "another rank"
