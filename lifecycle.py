"""The life of a training process outside training itself: output streams that nobody may block, the per-rank
log, child processes, and exits that never hang. (How a run decides to stop is stop.py.)"""
import atexit
import collections
import contextlib
import faulthandler
import multiprocessing
import multiprocessing.util  # noqa: F401  (imported before atexit.register below: see stop_children)
import os
import signal
import sys
import threading
import time


def exit_now(reason, code):
    """One line on stderr, stop the loader workers, and end the process without unwinding (no atexit handler,
    no `finally`: what runs now must not be able to hang)."""
    if isinstance(sys.stderr, Stream):  # (reentrant and never blocking: safe inside a signal handler)
        sys.stderr.write(f"\n{reason}\n")
    else:
        with contextlib.suppress(OSError):
            os.write(2, f"\n{reason}\n".encode())
    stop_children()
    close_output(timeout=2)
    os._exit(code)


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

# Terminal output waiting for a slow or stopped reader, in bytes; beyond it new output is dropped (and counted).
QUEUE_LIMIT = 4 << 20
ENCODING = "utf-8"


class _Terminal:
    """One thread that writes this process's terminal output (the fds sys.stdout and sys.stderr had), in the
    order it was written, so that the main thread never waits on a terminal, a pipe or a pseudo-terminal: a
    full pipe (`| sleep 600`) or a stopped pager would otherwise block a print, and with it the stop signals'
    handlers, which run between the main thread's bytecodes. A terminal that fails (a closed pipe, a hung-up
    ssh session) is dropped with one warning on the other; the log file, metrics and checkpoints carry on."""

    def __init__(self):
        self.lock = threading.Condition()
        self.queue = collections.deque()   # (fd, bytes)
        self.queued = 0
        self.dropped = 0
        self.dead = set()                   # fds that failed
        self.thread = None
        self.sync = False                   # in a forked child (a loader worker): no thread, write directly

    def put(self, fd, data):
        if fd in self.dead:
            return
        if self.sync:
            self._write(fd, data)
            return
        with self.lock:
            if self.queued + len(data) > QUEUE_LIMIT:
                self.dropped += len(data)
                return
            self.queue.append((fd, data))
            self.queued += len(data)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="terminal", daemon=True)
                self.thread.start()
            self.lock.notify()

    def _run(self):
        while True:
            with self.lock:
                while not self.queue:
                    self.lock.wait()
                fd, data = self.queue.popleft()
                dropped, self.dropped = self.dropped, 0
            if dropped:
                self._write(fd, f"[{dropped} bytes of output dropped here: the terminal was not reading]\n".encode())
            self._write(fd, data)
            with self.lock:
                self.queued -= len(data)
                self.lock.notify_all()

    def _write(self, fd, data):
        if fd in self.dead:
            return
        try:
            _write_all(fd, data)
        except OSError as e:
            self.dead.add(fd)
            name = {_saved_fds.get(1, 1): "stdout", _saved_fds.get(2, 2): "stderr"}.get(fd, f"fd {fd}")
            goes = f"goes only to --log-file {_log['path']}" if _log["fd"] is not None else "is dropped"
            warning = f"warning: {name} cannot be written ({e.strerror}): its output {goes} from now on\n"
            terminals = (_saved_fds.get(1, 1), _saved_fds.get(2, 2))
            for other in (*(f for f in terminals if f != fd), _log["fd"]):
                if other is not None and other not in self.dead:
                    with contextlib.suppress(OSError):
                        _write_all(other, warning.encode(ENCODING, "backslashreplace"))

    def drain(self, timeout):
        """Wait (at most `timeout` s) until everything queued is written: `queued`, not `queue`, which is empty
        already while the thread writes the last item it took (an exit then would lose the run's last line)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.queued and time.monotonic() < deadline and self.thread is not None:
                self.lock.wait(max(0.0, deadline - time.monotonic()))


_terminal = _Terminal()
_saved_fds = {}                      # {1: the terminal's stdout fd, 2: its stderr fd}, as this process found them
_log = {"fd": None, "path": None}    # --log-file (capture_output): its fd, which fds 1 and 2 also point to


class Stream:
    """sys.stdout or sys.stderr: each write goes to the --log-file at once (a plain file: the log is complete and
    in write order even if the process is killed the next moment) and to the terminal through _Terminal (never
    waiting on it). Text is encoded as UTF-8 with backslash escapes for what cannot be encoded (a file name with
    a byte that is not UTF-8 prints as '\\udce9', not as an error that would silence the run). Writes never
    raise."""

    def __init__(self, stream, fd):
        self._stream = stream   # the original, for attributes nobody writes through (isatty, encoding, ...)
        self._fd = fd           # 1 or 2
        self._lock = threading.RLock()  # reentrant: a signal handler may print while the main thread is in write()
        self._partial = ""      # the end of a line not written yet: lines go out whole, as line buffering does,
                                # so that processes sharing a terminal or the log (the ranks) do not mix lines

    def write(self, text):
        if not isinstance(text, str):
            text = str(text)
        with self._lock:
            self._partial += text
            cut = self._partial.rfind("\n") + 1
            if cut:
                whole, self._partial = self._partial[:cut], self._partial[cut:]
                self._emit(whole)
        return len(text)

    def _emit(self, text):
        data = text.encode(ENCODING, "backslashreplace")
        if _log["fd"] is not None:
            try:
                _write_all(_log["fd"], data)
            except OSError as e:
                log_failed(e)
        _terminal.put(_saved_fds.get(self._fd, self._fd), data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        """Out with a line not ended yet (print(..., end="", flush=True)); whole lines are out already."""
        with self._lock:
            if self._partial:
                text, self._partial = self._partial, ""
                self._emit(text)

    @property
    def dead(self):
        return _saved_fds.get(self._fd, self._fd) in _terminal.dead

    def fileno(self):
        return self._fd

    def __getattr__(self, name):  # isatty, encoding, errors, buffer, reconfigure, ...
        return getattr(self._stream, name)


def log_failed(error):
    """--log-file cannot be written any more (a full disk): said once on the terminal; the run goes on."""
    path, _log["fd"] = _log["path"], None
    with contextlib.suppress(OSError):
        os.dup2(_saved_fds[1], 1)  # native output goes back to the terminal too
        os.dup2(_saved_fds[2], 2)
    _terminal.put(_saved_fds.get(2, 2), f"warning: --log-file {path}: cannot write ({error.strerror}); the log "
                                        f"stops here\n".encode(ENCODING, "backslashreplace"))


def guard_streams():
    """Route sys.stdout and sys.stderr through Stream (see there). Idempotent."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, Stream):
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.flush()
            setattr(sys, name, Stream(stream, fd))


def _after_fork_in_child():
    _terminal.sync = True  # the parent's terminal thread does not exist here
    _terminal.thread = None
    _terminal.queue.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def capture_output(path):
    """Append everything this process writes to file descriptors 1 and 2 to `path`, as the original's
    `> train_$RANK_ID.log 2>&1`: Python's prints, and native output (C++ warnings, gloo/NCCL/HCCL messages,
    faulthandler dumps), which the kernel writes into the file directly -- one stream, in write order, complete
    when the process is killed, with no copying process that could die. Python's prints also still reach the
    terminal (Stream); native output goes to the file only. Raises OSError if `path` cannot be opened."""
    if _log["fd"] is not None:
        raise RuntimeError("capture_output: already capturing")
    guard_streams()
    log = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    _saved_fds.update({1: os.dup(1), 2: os.dup(2)})  # the terminal (not inherited by children: O_CLOEXEC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    _log.update(fd=1, path=path)


def close_output(timeout=2.0):
    """Before the process ends: give the terminal at most `timeout` seconds to take what is queued for it.
    The log needs nothing: every line is in the file already. Safe to call twice."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, Stream):
            stream.flush()
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL(None).fflush(None)  # C stdio buffers (native libraries' printf)
    _terminal.drain(timeout)


atexit.register(close_output)


def enable_faulthandler():
    """Python tracebacks of every thread on a crash (segfault, abort, bus error), written to fd 2: the
    terminal and, under capture_output, the rank's log."""
    if not faulthandler.is_enabled():  # (already on under PYTHONFAULTHANDLER=1 or pytest: leave it as it is)
        faulthandler.enable(file=2, all_threads=True)


