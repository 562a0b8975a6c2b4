"""Shared fixtures: real image folders on disk and a way to run main.py as users do."""
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Small, fast settings for end-to-end runs of main.py (tiny images, few steps).
SMALL_RUN = ["--device", "cpu", "--train-crop-size", "32", "--val-resize-size", "32", "--val-crop-size", "32",
             "--print-freq", "1", "--workers", "0", "--warmup-steps", "1"]

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40), (200, 40, 200)]


def write_image_folder(root, classes=3, train_per_class=8, val_per_class=4, size=40, fmt="JPEG", seed=0):
    """An ImageNet-layout folder of real image files: each class a noisy solid colour (easy to learn)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class_{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                base = np.array(COLOURS[c % len(COLOURS)], dtype=np.float32)
                pixels = np.clip(base + rng.normal(0, 25, (size, size + 4 * (i % 3), 3)), 0, 255).astype(np.uint8)
                ext = ".JPEG" if fmt == "JPEG" else ".png"
                Image.fromarray(pixels).save(os.path.join(folder, f"img_{i}{ext}"), format=fmt)
    return str(root)


@pytest.fixture(scope="module")
def torch_one_thread():
    """For in-process tests on tiny inputs: intra-op threads buy nothing there, and on a small shared machine
    OpenMP threads spin-waiting on a busy core made torch ops ~70x slower. Restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(tmp_path / "data")


def run_main(args, cwd=REPO, env=None, timeout=600, inherit_env=True):
    """Run `python main.py ARGS` in a subprocess; returns CompletedProcess with text output.

    env: variables set on top of this process's environment; with inherit_env=False, the child's whole
    environment (e.g. test_distributed's clean_env(...), which drops launcher variables such as RANK)."""
    full_env = dict(os.environ) if inherit_env else {}
    full_env.update(env or {})
    return subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_ok(proc, allow_traceback=False):
    """Exit code 0 and no traceback; on failure the message holds the run's stdout and stderr. Returns stdout.
    allow_traceback: a torchrun job that restarted after a killed rank, whose surviving ranks failed first."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n" \
                                 f"{proc.stderr[-6000:]}"
    assert allow_traceback or "Traceback" not in proc.stderr, proc.stderr[-6000:]
    return proc.stdout


def run_script(script, args, env=None, timeout=900, inherit_env=True):
    """`bash test/SCRIPT ARGS` (a launcher); env as for run_main."""
    full_env = dict(os.environ) if inherit_env else {}
    full_env.update(env or {})
    return subprocess.run(["bash", os.path.join(REPO, "test", script), *map(str, args)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# Variables of a launcher (torchrun, the original's RANK_ID/RANK_SIZE, our launchers): pytest itself may run
# under one, and a test's child must see only what the test gives it.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "RANK_ID", "RANK_SIZE",
               "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "TORCHELASTIC_RUN_ID",
               "TORCHELASTIC_RESTART_COUNT", "ASCEND_DEVICE_ID", "OUTPUT_ROOT")


def clean_env(**extra):
    """This environment without launcher variables, one thread per process, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_one_line_error(proc, fragment=None):
    """Non-zero exit, exactly one line on stderr starting with 'error:', no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    if fragment:
        assert fragment in lines[0], lines[0]


# ----------------------------------------------------------------------------
# Processes to watch while they run (signals at the moment that matters)
# ----------------------------------------------------------------------------

class Proc:
    """A main.py process whose output lines can be waited for while it runs."""

    def __init__(self, args, env, script=None):
        cmd = [sys.executable, script or os.path.join(REPO, "main.py"), *map(str, args)]
        self.p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True)
        self.lines, self.out, self.err = queue.Queue(), [], []
        threading.Thread(target=self._read, args=(self.p.stdout, self.out, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.p.stderr, self.err, False), daemon=True).start()

    def _read(self, stream, into, forward):
        for line in stream:
            into.append(line)
            if forward:
                self.lines.put(line)

    def wait_for(self, pattern, timeout=300):
        """The first stdout line (from now on) matching `pattern`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if re.search(pattern, line):
                return line
        self.kill()
        raise AssertionError(f"no line matching {pattern!r}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}")

    def finish(self, timeout):
        """Exit code, waiting at most `timeout` seconds (then the process is killed and the test fails)."""
        try:
            code = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout} s\n--- stdout\n{self.stdout}\n--- stderr\n"
                                 f"{self.stderr}")
        time.sleep(0.2)  # let the reader threads take the last lines
        return code

    def kill(self):
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait()

    @property
    def stdout(self):
        return "".join(self.out)

    @property
    def stderr(self):
        return "".join(self.err)


def start_ranks(n, args, script=None, **env):
    """n gloo ranks on this machine, each with the variables torchrun sets (no torchrun agent: a rank that
    dies is not followed by a SIGTERM to the others, so what the survivors do on their own is visible)."""
    port = free_port()
    return [Proc(args, clean_env(RANK=r, WORLD_SIZE=n, LOCAL_RANK=r, LOCAL_WORLD_SIZE=n, MASTER_ADDR="127.0.0.1",
                                 MASTER_PORT=port, **env), script) for r in range(n)]


def load(path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


def metrics(folder):
    path = os.path.join(folder, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def recording_python(tmp_path):
    """A PYTHON for the launchers that runs their own `python -c` checks for real but only records, in
    started.txt, each other command line (main.py) instead of running it: whether a run began, and with what
    main.py would have been given, in no time."""
    started = tmp_path / "started.txt"
    script = tmp_path / "python"
    script.write_text(f'#!/bin/sh\ncase "$1" in -c) exec {sys.executable} "$@" ;; esac\n'
                      f'printf "%s\\n" "$*" >> {started}\nexit 0\n')
    script.chmod(0o755)
    return script, started


# Records each training sample the loader delivers, per rank (0 loader workers: in this process, in order).
SAMPLE_LOG_WRAPPER = """
import os, sys
sys.path.insert(0, {repo!r})
import data, main
_getitem = data.ImageFolderDataset.__getitem__
def __getitem__(self, key):
    if isinstance(key, tuple):  # a training sample: (epoch, index, repeat)
        with open(os.environ["SAMPLE_LOG"] + "." + os.environ.get("RANK", "0"), "a") as f:
            f.write("%d\\n" % key[1])
    return _getitem(self, key)
data.ImageFolderDataset.__getitem__ = __getitem__
sys.exit(main.run(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def data48(tmp_path_factory):
    """48 training images of 3 learnable classes: 12 steps of a global batch of 4."""
    return write_image_folder(tmp_path_factory.mktemp("data48") / "data", classes=3, train_per_class=16,
                              val_per_class=2, size=32)


def children(pid):
    """The pids of a process's children (a trainer's loader workers)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]
