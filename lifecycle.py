"""The life of a training process: stop signals, output streams, the per-rank log, and exits that never hang.

    stop = StopSignal()                 # SIGTERM, SIGINT, SIGHUP
    with stop.deferred():               # a first signal is only recorded: finish the step, then checkpoint
        for ...:
            with stop.waiting(), data_timeout(args.data_timeout, "train"):
                batch = next(batches)   # a signal while waiting for data stops at once (no step in flight)
            ...
            if stop.requested: save and exit 75
    # outside deferred(): a first signal raises Interrupted at once (nothing to save)
    # anywhere: a second signal exits at once, without saving

Interrupted and DataStall derive from BaseException, as KeyboardInterrupt does: they can be raised by a signal
handler at any line, and an `except Exception` on the way (the dataset's "unreadable image" handler, a
fallback decoder) must not turn a stop into a skipped image.
"""
import atexit
import contextlib
import faulthandler
import multiprocessing
import multiprocessing.util  # noqa: F401  (imported before atexit.register below: see stop_children)
import os
import select
import signal
import subprocess
import sys
import threading
import time


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# A second signal this soon after the first is the same request delivered twice, not a second request: a
# scheduler that signals every process of a job (scancel, a Kubernetes pod's SIGTERM) reaches the ranks
# directly AND through torchrun, which forwards it. A person's second Ctrl-C comes later.
DUPLICATE_WINDOW_S = 1.0


class Interrupted(BaseException):
    """A stop signal where there is nothing to save: the process should end now, in one line."""

    def __init__(self, signum, where=None):
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.where = where  # what the process was doing, when the raiser knows it
        super().__init__(f"stopped by {self.signal_name}" + (f" during {where}" if where else ""))


class DataStall(BaseException):
    """The data loader delivered nothing for --data-timeout seconds; str() is the one-line message."""


# ----------------------------------------------------------------------------
# Stop signals
# ----------------------------------------------------------------------------

class StopSignal:
    """SIGTERM, SIGINT and SIGHUP (a closed ssh session: treated like SIGTERM).

    Outside deferred() a first signal raises Interrupted at once. Inside deferred() it only sets `requested`
    (and `signal_name`), so the trainer can finish its step and write a checkpoint; inside waiting() it
    raises Interrupted again, since no step is in flight. A second signal, anywhere, ends the process at
    once without saving: the user (or the scheduler) has asked twice."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self.signum = None
        self._first_at = None
        self._deferred = 0
        self._waiting = 0
        self._previous = {}
        for signum in STOP_SIGNALS:
            previous = signal.getsignal(signum)
            if signum == signal.SIGHUP and previous == signal.SIG_IGN:
                continue  # started under nohup: the user asked for the run to survive a closed terminal
            self._previous[signum] = previous
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            if time.monotonic() - self._first_at < DUPLICATE_WINDOW_S:
                return  # the same request delivered twice (see DUPLICATE_WINDOW_S): keep saving
            exit_now(f"second {signal.Signals(signum).name}: exiting now without saving", 128 + signum)
        self.requested = True
        self._first_at = time.monotonic()
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        if not self._deferred or self._waiting:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self):
        """A first signal in here is only recorded (requested, signal_name): the trainer saves, then stops."""
        self._deferred += 1
        try:
            yield self
        finally:
            self._deferred -= 1

    @contextlib.contextmanager
    def waiting(self):
        """Around fetching the next batch inside deferred(): a signal now, or one recorded just before,
        raises Interrupted (a loader blocked on a hung file would otherwise never let the trainer see it)."""
        self._waiting += 1  # before the check: a signal between the two lines raises in the handler
        try:
            self.raise_if_requested()
            yield self
        finally:
            self._waiting -= 1

    def raise_if_requested(self):
        if self.requested:
            raise Interrupted(self.signum)

    def restore(self):
        """Put back the handlers that were there before (in-process tests)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def innermost_stage(traceback, stages):
    """stages[name] of the innermost function on `traceback` whose name is in `stages`, else None: where a
    signal stopped the process, for its one-line message."""
    where = None
    while traceback is not None:
        where = stages.get(traceback.tb_frame.f_code.co_name, where)
        traceback = traceback.tb_next
    return where


def exit_now(reason, code):
    """One line on stderr, stop the loader workers and the log's tee, and end the process without unwinding
    (no atexit handler, no `finally`: what runs now must not be able to hang)."""
    try:
        os.write(2, f"\n{reason}\n".encode())  # not sys.stderr: the signal may have landed inside its write()
    except OSError:
        pass
    stop_children()
    close_output(timeout=2)
    os._exit(code)


# ----------------------------------------------------------------------------
# Data stalls
# ----------------------------------------------------------------------------

@contextlib.contextmanager
def data_timeout(seconds, stage):
    """Raise DataStall if the body (fetching a batch) takes longer than `seconds`; None or 0: no limit.

    A timer signal (SIGALRM), not a watchdog thread: with 0 loader workers the main thread itself is blocked
    in a read() of the stalled file, and only a signal interrupts that. Off outside the main thread, where
    Python cannot handle signals. Not nested: the inner one would cancel the outer one's timer."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise DataStall(f"{stage}: no batch for {seconds:g} s from the data loader (a hung file system? raise "
                        f"--data-timeout)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------
# Child processes
# ----------------------------------------------------------------------------

def stop_children(timeout=3.0):
    """SIGKILL every live multiprocessing child (the DataLoader's workers) and reap it.

    The workers ignore SIGTERM on purpose (data._ignore_stop_signals), and multiprocessing's own exit
    handler stops leftover children with SIGTERM and then joins them without a time limit: any exit that
    leaves a loader iterator alive (an exception whose traceback holds it, a closed stdout) used to hang
    there forever. Registered with atexit below, after multiprocessing's handler, so it runs first (LIFO).
    A child that does not die within `timeout` seconds (stuck in the kernel on a dead file system) is
    dropped from multiprocessing's list, so that its join cannot hang the exit either. Safe to call twice."""
    if threading.current_thread() is not threading.main_thread():
        return
    children = multiprocessing.active_children()
    if not children:
        return
    # torch's DataLoader turns a worker's death into a RuntimeError raised from its SIGCHLD handler; these
    # deaths are ours, so that handler is off while we reap.
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        for child in children:
            try:
                child.kill()
            except (OSError, ValueError):
                pass  # already gone, or already closed
        deadline = time.monotonic() + timeout
        for child in children:
            try:
                child.join(max(0.0, deadline - time.monotonic()))
                if child.exitcode is None:  # (no public API forgets a child: this private set is the list)
                    multiprocessing.process._children.discard(child)
            except (OSError, ValueError, AttributeError):
                pass
    finally:
        signal.signal(signal.SIGCHLD, previous)


atexit.register(stop_children)


# ----------------------------------------------------------------------------
# Output streams
# ----------------------------------------------------------------------------

class GuardedStream:
    """sys.stdout or sys.stderr whose failed writes (a closed pipe, a full disk) do not raise: the stream is
    marked dead, one warning goes to the other stream, and later writes to it are dropped. A training run
    must not die because nobody is reading its terminal any more; the log file, metrics and checkpoints
    carry on."""

    def __init__(self, stream, name):
        self._stream = stream
        self._name = name
        self.dead = False

    def write(self, text):
        if self.dead:
            return len(text)
        try:
            return self._stream.write(text)
        except (OSError, ValueError) as e:
            self._die(e)
            return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        if self.dead:
            return
        try:
            self._stream.flush()
        except (OSError, ValueError) as e:
            self._die(e)

    def _die(self, error):
        self.dead = True
        # What is still buffered would fail again at every flush, and at exit with an "Exception ignored"
        # message: send the file descriptor to /dev/null (so C code writing to it gets no error either).
        try:
            fd = self._stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
            self._stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
        other = sys.stderr if self._name == "stdout" else sys.stdout
        reason = os.strerror(error.errno) if isinstance(error, OSError) and error.errno else str(error)
        if not getattr(other, "dead", False):
            try:
                other.write(f"warning: {self._name} cannot be written ({reason}): its output is dropped from now "
                            f"on\n")
                other.flush()
            except (OSError, ValueError):
                pass

    def __getattr__(self, name):  # fileno, isatty, encoding, buffer, reconfigure, ...
        return getattr(self._stream, name)


def guard_streams():
    """Make failing writes to sys.stdout and sys.stderr harmless (see GuardedStream). Idempotent."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, GuardedStream):
            setattr(sys, name, GuardedStream(stream, name))


# The tee of capture_output: (process, the original stdout and stderr fds), or None.
_tee = None

def tee(log, path, sources):
    """The copying process of capture_output (run as `python lifecycle.py --tee ...`): what arrives on each pipe
    in `sources` ({read fd: terminal fd}) goes to that terminal fd and is appended to the file `log`.

    A process, not a thread: the log stays complete when the trainer dies by SIGKILL or a segfault. It ignores
    the stop signals (a Ctrl-C reaches the whole process group, and the trainer's last lines must still be
    copied) and ends when every writer has closed its end of the pipes. A terminal that cannot be written any
    more (a closed pipe, a hung-up ssh session) is dropped with one warning, and the file carries on."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    names = {1: "stdout", 2: "stderr"}
    while sources:
        for fd in select.select(list(sources), [], [])[0]:
            data = os.read(fd, 1 << 16)
            if not data:
                del sources[fd]
                continue
            terminal = sources[fd]
            if terminal is not None:
                try:
                    _write_all(terminal, data)
                except OSError as e:
                    sources[fd] = None
                    _try_write([log, *(t for t in sources.values() if t is not None)],
                               f"warning: {names[terminal]} cannot be written ({e.strerror}): its output goes only "
                               f"to --log-file {path} from now on\n")
            if log is not None:
                try:
                    _write_all(log, data)
                except OSError as e:
                    log = None
                    _try_write([t for t in sources.values() if t is not None],
                               f"warning: --log-file {path}: cannot write ({e.strerror}); the log stops here\n")


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _try_write(fds, text):
    for fd in fds:
        if fd is not None:
            with contextlib.suppress(OSError):
                _write_all(fd, text.encode())


def capture_output(path):
    """Append everything this process writes to file descriptors 1 and 2 to `path`, and still show it where it
    went before (the terminal): Python's prints, C++ warnings, gloo/NCCL/HCCL messages, faulthandler dumps,
    as the original's `> train_$RANK_ID.log 2>&1` does, plus the terminal.

    The copying is done by a small child process reading two pipes that replace fds 1 and 2, so that the file
    stays complete if this process is killed. Raises OSError if `path` cannot be opened for appending."""
    global _tee
    if _tee is not None:
        raise RuntimeError("capture_output: already capturing")
    log = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    sys.stdout.flush()
    sys.stderr.flush()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        # -S: no site-packages to import, the standard library is all it needs (a fast start)
        tee = subprocess.Popen([sys.executable, "-S", os.path.abspath(__file__), "--tee", str(log), path,
                                str(out_r), str(err_r)], pass_fds=(log, out_r, err_r), stdin=subprocess.DEVNULL)
    finally:
        os.close(log)
        os.close(out_r)
        os.close(err_r)
    saved = (os.dup(1), os.dup(2))  # the terminal, put back by close_output (not inherited by children)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.close(out_w)
    os.close(err_w)
    _tee = (tee, saved)
    # A pipe would make sys.stdout block-buffered: keep lines appearing as they are printed.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(line_buffering=True)
    atexit.register(close_output)


def close_output(timeout=5.0):
    """End capture_output: flush, give fds 1 and 2 back to the terminal and wait (at most `timeout` s) for the
    tee to write the rest, so the file is complete when the process has exited. Safe to call twice."""
    global _tee
    if _tee is None:
        return
    tee, saved = _tee
    _tee = None
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL(None).fflush(None)  # C stdio buffers (native libraries' printf) go through the pipe too
    stop_children()  # loader workers hold copies of the pipes: the tee sees the end only when they are gone
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    os.close(saved[0])
    os.close(saved[1])
    try:
        tee.wait(timeout)
    except subprocess.TimeoutExpired:
        pass  # another process still holds the pipe (a grandchild): the tee finishes when it closes it


def enable_faulthandler():
    """Python tracebacks of every thread on a crash (segfault, abort, bus error), written to fd 2: the
    terminal and, under capture_output, the rank's log."""
    if not faulthandler.is_enabled():  # (already on under PYTHONFAULTHANDLER=1 or pytest: leave it as it is)
        faulthandler.enable(file=2, all_threads=True)


if __name__ == "__main__" and sys.argv[1:2] == ["--tee"]:  # capture_output's child: --tee LOG PATH OUT ERR
    tee(int(sys.argv[2]), sys.argv[3], {int(sys.argv[4]): 1, int(sys.argv[5]): 2})
