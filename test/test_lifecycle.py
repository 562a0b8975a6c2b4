"""Process life (lifecycle.py): stop signals, streams nobody reads, the per-rank log, exits that never hang.

Unit cases run a few lines of Python in a fresh process (real signals sent with os.kill, real pipes, real FIFOs);
end-to-end cases run `python main.py` as a user would (densenet121 on 32 px images, a couple of steps). Every wait
has a time limit, so a regression (a hang) fails the test instead of the suite.
"""
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import REPO, SMALL_RUN, clean_env, free_port, write_image_folder

TINY = ["--model", "densenet121", *SMALL_RUN, "-b", "4", "--epochs", "1"]
LIMIT = 300  # seconds for a whole main.py run on a busy 2-core machine: far above a normal run, far below "hung"


def snippet(code, timeout=60, **popen):
    """Run `code` in a fresh Python (the repository importable); CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=clean_env(), **popen)


class Background:
    """A process whose stdout is read line by line in a thread; stderr goes to a file. Killed (with its
    process group) if still running when the test is done with it."""

    def __init__(self, cmd, tmp_path, env=None, stdout=subprocess.PIPE, close_stdout_on=None):
        self.err_path = tmp_path / f"stderr_{time.monotonic_ns()}.txt"
        self.lines, self.seen = [], threading.Event()
        self.pattern, self.close_stdout_on = None, close_stdout_on
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env or clean_env(), stdout=stdout, stderr=err,
                                         text=True, start_new_session=True)
        if stdout == subprocess.PIPE:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.pattern and re.search(self.pattern, line):
                self.seen.set()
            if self.close_stdout_on and re.search(self.close_stdout_on, line):
                self.proc.stdout.close()  # the reader is gone, as `| head` leaves it: the next write fails
                return

    def wait_for(self, pattern, timeout=LIMIT):
        """Until a stdout line matches `pattern`; the test fails if the process ends or `timeout` passes first."""
        self.seen.clear()
        self.pattern = pattern
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, line) for line in list(self.lines)):
            if self.seen.wait(0.2):
                continue
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no line matching {pattern!r} (exit {self.proc.returncode})\n--- stdout\n"
                            f"{self.stdout}\n--- stderr\n{self.stderr}")

    def finish(self, timeout=LIMIT):
        """The exit code, waiting at most `timeout` seconds (else the test fails: the process hung)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running {timeout} s later (hung?)\n--- stdout\n{self.stdout}\n--- stderr\n"
                        f"{self.stderr}")

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    @property
    def stdout(self):
        return "".join(self.lines)

    @property
    def stderr(self):
        return self.err_path.read_text()


def main_cmd(*args):
    return [sys.executable, os.path.join(REPO, "main.py"), *map(str, args)]


def wait_for_file_text(path, text, timeout=30):
    """The log is written by a tee that may finish a moment after the process: poll for `text`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and text in open(path, errors="replace").read():
            return open(path, errors="replace").read()
        time.sleep(0.2)
    pytest.fail(f"{text!r} not in {path} within {timeout} s:\n" + (open(path).read() if os.path.exists(path) else
                                                                     "(no file)"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("lifecycle") / "data", classes=2, train_per_class=4,
                              val_per_class=2, size=32)


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """40 training images: at batch 2, 20 steps, so a signal sent after step 1 arrives mid-epoch."""
    return write_image_folder(tmp_path_factory.mktemp("lifecycle_many") / "data", classes=2, train_per_class=20,
                              val_per_class=2, size=32)


# ----------------------------------------------------------------------------
# stop.Stop: the phases, with real signals
# ----------------------------------------------------------------------------

def test_a_signal_during_the_set_up_raises_interrupted_at_once():
    proc = snippet("""
        import os, signal, time, stop
        s = stop.Stop()
        s.doing = "the dataset scan"
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            print("not interrupted")
        except stop.Interrupted as e:
            print("interrupted", e.signal_name, e.signum, e.where.replace(" ", "_"))
    """)
    assert proc.stdout.split() == ["interrupted", "SIGTERM", "15", "the_dataset_scan"], proc.stdout + proc.stderr


def test_a_signal_while_running_is_recorded_and_waiting_raises():
    """While running the step goes on; fetching the next batch then stops at once (the signal came before the
    wait), and a signal that arrives while the main thread is blocked in a read() ends that read."""
    proc = snippet("""
        import os, signal, threading, time, stop
        s = stop.Stop()
        with s.running():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            print("step finished", s.cause.code, s.cause.reason)
            try:
                with s.waiting():
                    print("waited anyway")
            except stop.Interrupted as e:
                print("waiting raised", e.signal_name)
        s.restore()

        s = stop.Stop()
        r, w = os.pipe()
        with s.running():
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
            start = time.monotonic()
            try:
                with s.waiting():
                    os.read(r, 1)  # nobody writes: blocked, as a loader reading a hung file
            except stop.Interrupted as e:
                print("blocked read interrupted", e.signal_name, time.monotonic() - start < 5)
    """)
    assert proc.stdout.splitlines() == ["step finished 75 SIGINT", "waiting raised SIGINT",
                                        "blocked read interrupted SIGTERM True"], proc.stdout + proc.stderr


SECOND_SIGNAL = """
    import multiprocessing, os, signal, sys, time, stop

    def worker():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as data._ignore_stop_signals
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        time.sleep(600)

    if __name__ == "__main__":
        child = multiprocessing.get_context("fork").Process(target=worker)
        child.start()
        print(child.pid, flush=True)
        s = stop.Stop()
        with getattr(s, sys.argv[1])():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            print("first recorded", s.cause.reason, flush=True)
            os.kill(os.getpid(), signal.SIGINT)  # the same request, delivered again at once
            time.sleep(0.2)
            print("duplicate ignored", flush=True)
            time.sleep(stop.DUPLICATE_WINDOW_S)
            os.kill(os.getpid(), signal.SIGINT)  # a second request
            time.sleep(3)
            print("still running", flush=True)
        child.kill()
"""


def test_a_second_signal_exits_at_once_and_kills_loader_workers():
    """While training, a second Ctrl-C ends the process at once: one line, exit 130, and the loader's workers
    (which ignore SIGTERM) do not outlive it. The same signal repeated within stop.DUPLICATE_WINDOW_S is one
    request delivered twice (a scheduler signalling every process, and torchrun forwarding it too)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SECOND_SIGNAL), "running"], cwd=REPO,
                          capture_output=True, text=True, timeout=30, env=clean_env())
    pid, first, duplicate, *rest = proc.stdout.splitlines()
    assert (first, duplicate) == ("first recorded SIGINT", "duplicate ignored") and not rest, proc.stdout + proc.stderr
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    assert [l for l in proc.stderr.splitlines() if l.strip()] == ["second SIGINT: exiting now without saving"]
    assert not os.path.exists(f"/proc/{pid}"), "the worker outlived the process"


def test_a_second_signal_during_a_save_lets_the_save_finish():
    """While a checkpoint is written and the ranks wait for it (stop.Stop.saving), no signal interrupts it: a
    launcher stopping the job, or an impatient user, cannot cost the checkpoint being written."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SECOND_SIGNAL), "saving"], cwd=REPO,
                          capture_output=True, text=True, timeout=30, env=clean_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[1:] == ["first recorded SIGINT", "duplicate ignored", "still running"]


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2])
def test_sighup_and_the_preemption_notices_are_handled_like_sigterm(signum):
    proc = snippet(f"""
        import os, signal, time, stop
        s = stop.Stop()
        with s.running():
            os.kill(os.getpid(), {int(signum)})
            time.sleep(0.2)
            print("recorded", s.cause.code, s.cause.reason)
    """)
    assert proc.returncode == 0 and proc.stdout.split() == ["recorded", "75", signal.Signals(signum).name], \
        proc.stdout + proc.stderr


def test_sighup_stays_ignored_under_nohup():
    """nohup starts the program with SIGHUP ignored: the user asked for it to outlive the terminal."""
    proc = snippet("""
        import os, signal, time, stop
        s = stop.Stop()
        with s.running():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.2)
            print("survived", s.requested)
        os.kill(os.getpid(), signal.SIGTERM)  # the others still count
        time.sleep(5)
    """, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert proc.stdout.split() == ["survived", "False"], proc.stdout + proc.stderr
    assert "Interrupted" in proc.stderr  # the SIGTERM raised it (uncaught here)


# ----------------------------------------------------------------------------
# Data stalls and exits: the mechanisms
# ----------------------------------------------------------------------------

FIFO_LOADER = """
    import os, sys, time, torch, engine

    class Fifo(torch.utils.data.Dataset):  # one "image" that never delivers a byte, as a hung file system
        def __len__(self):
            return 4
        def __getitem__(self, i):
            with open(sys.argv[1], "rb") as f:
                return f.read(1)

    if __name__ == "__main__":
        os.mkfifo(sys.argv[1])
        keep_open = os.open(sys.argv[1], os.O_RDWR)  # a writer exists, so the reader blocks in read(), not open()
        loader = torch.utils.data.DataLoader(Fifo(), num_workers=int(sys.argv[2]))
        start = time.monotonic()
        try:
            with engine.data_timeout(1.5, "training data (epoch 0, step 1)"):
                next(iter(loader))
        except engine.DataStall as e:
            print(f"{time.monotonic() - start:.1f}|{e}", flush=True)
            sys.exit(2)
"""


@pytest.mark.parametrize("workers", [0, 1])
def test_data_timeout_stops_a_loader_blocked_on_a_fifo(tmp_path, workers):
    """0 workers: the main thread itself is blocked in read(); 1 worker: the worker is, and ignores SIGTERM --
    the process must still end at once."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(FIFO_LOADER), str(tmp_path / "img.JPEG"),
                           str(workers)], cwd=REPO, capture_output=True, text=True, timeout=90, env=clean_env())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    seconds, message = proc.stdout.strip().split("|")
    assert 1.4 <= float(seconds) < 10, seconds
    assert message == ("training data (epoch 0, step 1): no batch for 1.5 s from the data loader (a hung file "
                       "system? raise --data-timeout)")
    assert time.monotonic() - start < 60


def test_exit_does_not_wait_for_workers_that_ignore_sigterm():
    """multiprocessing's exit handler SIGTERMs leftover children and joins them without a limit: with loader
    workers (which ignore SIGTERM) still alive, sys.exit used to hang forever. Importing lifecycle is enough."""
    proc = snippet("""
        import multiprocessing, signal, sys, time
        import lifecycle

        def worker():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(600)

        if __name__ == "__main__":
            for _ in range(2):
                multiprocessing.get_context("fork").Process(target=worker, daemon=True).start()
            time.sleep(0.5)
            sys.exit(3)
    """, timeout=30)
    assert proc.returncode == 3, proc.stderr


def test_failed_stdout_writes_are_dropped_with_one_warning():
    """A closed pipe: prints go on without an exception, and stderr says once what happened."""
    r, w = os.pipe()
    os.close(r)  # nobody will ever read: every write to the pipe fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
            import sys, lifecycle
            lifecycle.guard_streams()
            for i in range(3):
                print("line", i, flush=True)
            print("done", file=sys.stderr)
        """)], cwd=REPO, stdout=w, stderr=subprocess.PIPE, text=True, timeout=60, env=clean_env())
    finally:
        os.close(w)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["warning: stdout cannot be written (Broken pipe): its output is dropped "
                                        "from now on", "done"], proc.stderr


def test_the_last_line_reaches_a_slow_terminal_before_the_process_ends():
    """main.py ends with os._exit (no interpreter teardown, no daemon thread left running): close_output must wait
    for the line the terminal thread is writing, not only for an empty queue. Found by a rank whose one-line error
    never reached its stderr pipe under load (test_slurm's ranks-disagree tests, once)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, sys, time, lifecycle
        lifecycle.guard_streams()
        write_all = lifecycle._write_all
        lifecycle._write_all = lambda fd, data: (time.sleep(0.5), write_all(fd, data))  # a slow reader
        print("error: the last line", file=sys.stderr)
        lifecycle.close_output()
        os._exit(2)
    """)], cwd=REPO, capture_output=True, text=True, timeout=60, env=clean_env())
    assert proc.returncode == 2 and proc.stderr == "error: the last line\n", proc.stderr


def test_log_capture_survives_ctrl_c_to_the_process_group(tmp_path):
    """Ctrl-C reaches every process of the foreground group: what the trainer writes after it (its "Preempted
    ... checkpoint saved" line) must still reach the file and the terminal; native writes to fd 2 reach the
    file (the kernel writes them there: no copying process stands in between)."""
    log = tmp_path / "train_0.log"
    run = Background([sys.executable, "-c", textwrap.dedent("""
        import os, signal, sys, time, lifecycle
        lifecycle.capture_output(sys.argv[1])
        signalled = []
        signal.signal(signal.SIGINT, lambda *_: signalled.append(1))
        print("ready", flush=True)
        while not signalled:
            time.sleep(0.05)
        print("saved after the signal", flush=True)
        os.write(2, b"native write after the signal\\n")
    """), str(log)], tmp_path)
    run.wait_for("^ready")
    os.killpg(run.proc.pid, signal.SIGINT)
    assert run.finish(timeout=30) == 0, run.stderr
    assert log.read_text().splitlines() == ["ready", "saved after the signal", "native write after the signal"]
    assert "saved after the signal" in run.stdout


ALTERNATING = """
    import os, sys, lifecycle
    lifecycle.capture_output(sys.argv[1])
    for i in range(1000):
        print(f"out {i}")
        print(f"err {i}", file=sys.stderr)
        os.write(1 + i % 2, f"native {i}\\n".encode())  # C code writing to fd 1 or 2 directly
    print("children:", len(__import__("multiprocessing").active_children()), os.listdir(f"/proc/{os.getpid()}/task")
          and len(open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()), flush=True)
    os.kill(os.getpid(), 9)  # as the OOM killer ends it: no exit handler runs
"""


def test_the_rank_log_is_one_stream_in_write_order_and_complete_when_killed(tmp_path):
    """The original's `> train_N.log 2>&1`: stdout and stderr, Python's and native, in the order they were
    written (the old two-pipe copier put the first stderr line after 2,000 stdout lines), and nothing lost when
    the process is SIGKILLed right after. No copying process exists that could die and silence the run."""
    log = tmp_path / "train_0.log"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(ALTERNATING), str(log)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env=clean_env())
    assert proc.returncode == -signal.SIGKILL
    expected = [line for i in range(1000) for line in (f"out {i}", f"err {i}", f"native {i}")]
    lines = log.read_text().splitlines()
    assert lines[:-1] == expected
    assert lines[-1] == "children: 0 0"  # no child process copies the output: none can die
    # The terminal still shows the Python lines, each stream its own.
    assert proc.stdout.splitlines()[:3] == ["out 0", "out 1", "out 2"] and proc.stderr.startswith("err 0\n")


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_bad_data_timeout_is_one_line(value, capfd):
    import main
    assert main.run(["--synthetic", "--device", "cpu", "--data-timeout", value]) == 2
    out, err = capfd.readouterr()
    assert err == "error: --data-timeout must be >= 0 (0: no limit)\n", err


# ----------------------------------------------------------------------------
# main.py end to end
# ----------------------------------------------------------------------------

def test_closed_stdout_keeps_training_into_the_log_and_exits(images, tmp_path):
    """`python main.py ... | head -1`: the reader goes away while loader workers run. The run finishes, the log
    keeps every line, and the process exits (it used to end in a BrokenPipeError traceback and then hang
    at exit, joining workers that ignore SIGTERM)."""
    out = tmp_path / "out"
    log = out / "train_0.log"
    run = Background(main_cmd("--data-path", images, "--output-dir", out, *TINY, "--workers", "1",
                              "--max-steps", "2", "--log-file", out / "train_{rank}.log"),
                     tmp_path, close_stdout_on=r"Epoch: \[0\]")
    code = run.finish()
    assert code == 0, run.stderr
    assert "Traceback" not in run.stderr
    text = wait_for_file_text(log, "Run summary")
    assert "warning: stdout cannot be written (Broken pipe)" in text
    assert re.search(r"Epoch: \[0\]\s+\[2/2\]", text) and "Acc@1" in text  # written after the pipe closed
    assert os.path.exists(out / "checkpoint.pth")


def test_stdout_on_a_full_device_does_not_end_the_run(images, tmp_path):
    """stdout to /dev/full (ENOSPC on every write), loader workers running: one warning, the run trains to the
    end and saves."""
    out = tmp_path / "out"
    with open("/dev/full", "w") as full:
        run = Background(main_cmd("--data-path", images, "--output-dir", out, *TINY, "--workers", "1",
                                  "--max-steps", "2"), tmp_path, stdout=full)
        code = run.finish()
    assert code == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert "warning: stdout cannot be written (No space left on device)" in run.stderr
    assert os.path.exists(out / "checkpoint.pth") and os.path.exists(out / "metrics.jsonl")


@pytest.fixture
def full_disk(tmp_path):
    """A real file system with no space left: a 64 KiB tmpfs, filled (we run as root in CI and here)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with open(mount / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * 4096)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_log_file_on_a_full_disk_costs_one_warning_not_the_run(images, tmp_path, full_disk):
    """The log's disk fills up: one warning on the terminal, and the run trains, evaluates and saves (the old
    log tee raised ENOSPC from the next print and ended the run with a traceback)."""
    out = tmp_path / "out"
    run = Background(main_cmd("--data-path", images, "--output-dir", out, *TINY, "--workers", "1",
                              "--max-steps", "2", "--log-file", full_disk / "train_{rank}.log"), tmp_path)
    code = run.finish()
    assert code == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert [l for l in run.stderr.splitlines() if l.strip()] == [
        f"warning: --log-file {full_disk}/train_0.log: cannot write (No space left on device); the log stops here"]
    assert "Run summary" in run.stdout  # the terminal still has everything
    assert os.path.exists(out / "checkpoint.pth")


# main.py on a data set whose first folder listing takes a minute, as on a slow network file system.
SLOW_SCAN = """
import os, sys, time
data, real_scandir, slowed = os.path.abspath(sys.argv[1]), os.scandir, []

def slow_scandir(path="."):
    if not slowed and isinstance(path, str) and os.path.abspath(path).startswith(data):
        slowed.append(path)
        print("scanning", path, flush=True)
        time.sleep(60)
    return real_scandir(path)

os.scandir = slow_scandir
import main
sys.exit(main.run(sys.argv[2:]))
"""


def test_sigint_during_dataset_scan_is_one_line(images, tmp_path):
    """Ctrl-C while the data set is scanned: one line, exit 130, at once (it used to be a KeyboardInterrupt
    traceback, or ignored until training started once the trainer's handler was installed)."""
    run = Background([sys.executable, "-c", SLOW_SCAN, images, "--data-path", images, "--output-dir",
                      str(tmp_path / "out"), *TINY], tmp_path)
    run.wait_for(r"^scanning ")
    sent = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    code = run.finish(timeout=60)
    assert time.monotonic() - sent < 30
    assert code == 128 + signal.SIGINT, run.stdout + run.stderr
    lines = [l for l in run.stderr.splitlines() if l.strip()]
    assert lines == ["stopped by SIGINT during the dataset scan (nothing to save)"], run.stderr


def make_fifo_training_set(root):
    """Training 'images' that are FIFOs nobody writes to: a read blocks forever, as on a hung file system."""
    write_image_folder(root, classes=2, train_per_class=2, val_per_class=2, size=32)
    for path in (root / "train").glob("*/*.JPEG"):
        path.unlink()
        os.mkfifo(path)
    return root


def test_stalled_loader_is_one_error_naming_the_stage(tmp_path):
    data = make_fifo_training_set(tmp_path / "data")
    run = Background(main_cmd("--data-path", data, "--output-dir", tmp_path / "out", *TINY, "--workers", "0",
                              "--data-timeout", "3"), tmp_path)
    run.wait_for(r"^Start training")
    started = time.monotonic()
    code = run.finish(timeout=120)
    assert time.monotonic() - started < 60
    assert code not in (0, 128 + signal.SIGKILL), run.stdout + run.stderr  # (what is saved: the trainer's tests)
    assert "Traceback" not in run.stderr
    errors = [l for l in run.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "training data (epoch 0, step 1): no batch for 3 s" in errors[0], run.stderr


def test_sigterm_while_the_loader_is_blocked_is_honoured(tmp_path):
    """SIGTERM while the only thing happening is a read that never returns: the run stops at once, saying so
    (it used to wait for that read forever)."""
    data = make_fifo_training_set(tmp_path / "data")
    run = Background(main_cmd("--data-path", data, "--output-dir", tmp_path / "out", *TINY, "--workers", "0"),
                     tmp_path)  # (the default --data-timeout, 600 s, is far away)
    run.wait_for(r"^Start training")
    time.sleep(1)  # now blocked in the first read
    sent = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    code = run.finish(timeout=120)
    assert time.monotonic() - sent < 30
    assert code == 75, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert "Preempted by SIGTERM" in run.stdout


def test_segfault_traceback_lands_in_the_log(many_images, tmp_path):
    """faulthandler writes to fd 2 from C; the rank's log must hold it even though the process died at once."""
    log = tmp_path / "train_0.log"
    run = Background(main_cmd("--data-path", many_images, "--output-dir", tmp_path / "out", *TINY, "-b", "2",
                              "--workers", "0", "--log-file", log), tmp_path)
    run.wait_for(r"Epoch: \[0\]\s+\[\s*1/")
    run.proc.send_signal(signal.SIGSEGV)
    code = run.finish(timeout=60)
    assert code == -signal.SIGSEGV, run.stdout + run.stderr
    text = wait_for_file_text(log, "Fatal Python error: Segmentation fault")
    assert re.search(r"Epoch: \[0\]\s+\[\s*1/", text)
    assert re.search(r'File ".*main\.py", line \d+ in ', text), text  # the Python stack at the crash


@pytest.mark.parametrize("world", [2])  # (each rank its own log, whatever the count: 2 shows it)
def test_native_output_of_every_rank_lands_in_its_log(images, tmp_path, world):
    """Ranks on gloo with TORCH_CPP_LOG_LEVEL=INFO: c10d writes its messages to fd 2 from C++. Each rank's
    train_<rank>.log holds its own (they used to reach only the terminal), where the rank's own lines are; the
    terminal shows the trainer's lines (native output goes to the log only: see lifecycle.capture_output)."""
    port = free_port()
    runs = [Background(main_cmd("--data-path", images, "--output-dir", tmp_path / "out", *TINY, "-b", 2 * world,
                                "--workers", "0", "--max-steps", "1", "--log-file", tmp_path / "train_{rank}.log"),
                       tmp_path, env=clean_env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world, LOCAL_WORLD_SIZE=world,
                                               MASTER_ADDR="127.0.0.1", MASTER_PORT=port, TORCH_CPP_LOG_LEVEL="INFO"))
            for rank in range(world)]
    codes = [run.finish() for run in runs]
    assert codes == [0] * world, "\n".join(run.stderr for run in runs)
    for rank, run in enumerate(runs):
        log = (tmp_path / f"train_{rank}.log").read_text()
        # glog-style lines from C++: "[I1201 17:24:19.084 socket.cpp:955] [c10d] The client socket has connected..."
        native = [l for l in log.splitlines() if re.match(r"(\[rank\d\]:)?\[I\d{4} [\d:.]+ \w+\.cpp:\d+\] ", l)]
        assert any("[c10d]" in l for l in native), log
        assert f"[rank{rank}]:[I" in log  # its own rank's lines...
        assert not any(f"[rank{other}]:" in log for other in range(world) if other != rank)  # ...not another's
        assert native[0] not in run.stderr and (rank > 0 or "Start training" in run.stdout)
