"""The launchers (test/train_*.sh over test/common.sh) as a scheduler, a shell and a user meet them: a signal
sent to the launcher reaches the trainer and the launcher waits for its save; nothing is moved aside before the
launch is known to be good, and a launch that wrote no run puts the previous one back; a closed pipe on stdout;
both spellings of the launcher's own flags; what a finished run names; the summary read by grep. Real
launchers, real processes, real signals, real files."""
import fcntl
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, SMALL_RUN, assert_ok, assert_one_line_error, clean_env, free_port, recording_python, \
    run_script, write_image_folder

import layout

TINY = [*SMALL_RUN, "--model", "densenet121", "--batch-size", "8"]
# The summary's keys: the original's (in its order), then ours.
ORIGINAL_KEYS = ["Network", "RankSize", "BatchSize", "DeviceType", "CaseName", "ActualFPS", "TrainingTime",
                 "TrainAccuracy", "ActualLoss", "E2ETrainingTime", "CompileTime"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes x 8 training images: 3 steps an epoch at batch 8."""
    return write_image_folder(tmp_path_factory.mktemp("launchers") / "data", size=32)


# ---- helpers ------------------------------------------------------------------------------------------------

def processes_with(text):
    """The pids of the processes (other than this one) whose command line contains `text`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # ended meanwhile
        if text in cmdline and state != "Z":
            pids.append(int(entry))
    return pids


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def lock_holder(folder):
    """The pid main.py wrote into the run folder's .lock ("pid N on HOST")."""
    return int(re.match(r"pid (\d+)", (folder / ".lock").read_text()).group(1))


class Launcher:
    """`bash test/SCRIPT ARGS` in the background, its output in files. Everything still running with the
    run's output root in its command line is killed (by pid) at close(): an old launcher left its trainer
    running, and a failed test must not leave processes behind either."""

    def __init__(self, script, args, env, tmp_path, root):
        self.out, self.err, self.root = tmp_path / "stdout.txt", tmp_path / "stderr.txt", str(root)
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.proc = subprocess.Popen(["bash", os.path.join(REPO, "test", script), *map(str, args)], cwd=REPO,
                                         env=env, stdout=o, stderr=e, start_new_session=True)

    def output(self):
        return self.out.read_text() + "\n--- stderr\n" + self.err.read_text()

    def wait_for(self, text, timeout=300):
        deadline = time.monotonic() + timeout
        while text not in self.out.read_text():
            assert self.proc.poll() is None, f"ended before {text!r}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {text!r} in {timeout} s:\n{self.output()}"
            time.sleep(0.1)

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher did not end within {timeout} s:\n{self.output()}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)
        for pid in processes_with(self.root):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def launchers():
    started = []

    def start(*args):
        started.append(Launcher(*args))
        return started[-1]
    yield start
    for launcher in started:
        launcher.close()


def main_calls(started):
    return [line for line in started.read_text().splitlines() if "main.py" in line] if started.exists() else []


def fake_previous_run(folder, started_at):
    """A finished run's folder as main.py and the launcher leave it; run.json's time is when it started."""
    folder.mkdir(parents=True)
    for name in ("checkpoint.pth", "model_best.pth", "metrics.jsonl", "train_0.log",
                 "DenseNet121_for_PyTorch_bs8_1p_acc.log"):
        (folder / name).write_text(f"{name} of the previous run\n")
    (folder / "run.json").write_text('{"network": "DenseNet121_for_PyTorch"}\n')
    os.utime(folder / "run.json", (started_at, started_at))
    later = started_at + 3600
    for name in ("checkpoint.pth", "model_best.pth", "metrics.jsonl", "train_0.log"):
        os.utime(folder / name, (later, later))
    return folder


def identity(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


def snapshot(folder):
    return {name: identity(folder / name) for name in sorted(os.listdir(folder))}


def stamp(t):
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(t))


FIRST_START = time.mktime((2001, 2, 3, 4, 5, 6, 0, 0, -1))  # a time no test runs at


# ---- item 1: a signal sent to the launcher reaches the trainer ---------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_1p_launcher_passes_a_signal_on_and_exits_with_the_trainers_75(data, tmp_path, launchers, signum):
    # The old launcher ran the trainer in the foreground: `kill <launcher>` ended bash (143) and left the
    # trainer training, an orphan nobody would stop or wait for.
    root = tmp_path / "output"
    run = launchers("train_full_1p.sh", [f"--data_path={data}", "--epochs=3", *TINY], clean_env(OUTPUT_ROOT=root),
                    tmp_path, root)
    run.wait_for("Epoch: [0]")
    trainer = lock_holder(root / "0")
    assert alive(trainer)
    os.kill(run.proc.pid, signum)  # the launcher alone, as a scheduler or `kill` does, not its process group
    code = run.wait(timeout=180)
    assert code == 75, run.output()
    assert not alive(trainer) and processes_with(str(root)) == [], run.output()  # nothing of the run left
    assert (root / "0" / "checkpoint.pth").is_file()
    name = signal.Signals(signum).name
    assert f"Preempted by {name}" in (root / "0" / "train_0.log").read_text()  # the trainer got that signal
    err = [line for line in run.err.read_text().splitlines() if line.strip()]
    assert err[-1].startswith("stopped by a signal; to continue from the last checkpoint: "), run.output()
    assert err[-1].endswith("--resume auto") and "Traceback" not in run.err.read_text()


def test_8p_launcher_passes_sigterm_through_torchrun_to_every_rank(data, tmp_path, launchers):
    # The old launcher died of the SIGTERM and left torchrun and both ranks running.
    root = tmp_path / "output"
    env = clean_env(RANK_SIZE=2, MASTER_PORT=free_port(), OUTPUT_ROOT=root)
    run = launchers("train_full_8p.sh", [f"--data_path={data}", "--epochs=3", *TINY], env, tmp_path, root)
    run.wait_for("Epoch: [0]")
    ranks = processes_with(str(root))
    assert len(ranks) >= 3, ranks  # torchrun's wrapper and two ranks (and their log copiers)
    os.kill(run.proc.pid, signal.SIGTERM)
    code = run.wait(timeout=180)
    assert code == 75, run.output()
    assert processes_with(str(root)) == [], run.output()  # torchrun and both ranks are gone
    assert (root / "0" / "checkpoint.pth").is_file()
    assert "Preempted by SIGTERM" in (root / "0" / "train_0.log").read_text()  # (rank 0 speaks for all ranks)
    err = [line for line in run.err.read_text().splitlines() if line.strip()]
    assert err[-1].startswith("stopped by a signal; to continue from the last checkpoint: "), run.output()
    assert "Traceback" not in run.err.read_text()


def test_torchrun_wrapper_turns_sigusr1_into_a_sigterm_that_torchrun_passes_on(data, tmp_path, launchers):
    # torchrun's agent handles SIGTERM, SIGINT and SIGHUP; a SIGUSR1 (a preemption notice) killed it and left
    # the ranks (in sessions of their own) running. The wrapper makes it a SIGTERM, which reaches the ranks.
    root = tmp_path / "output"
    env = clean_env(RANK_SIZE=2, MASTER_PORT=free_port(), OUTPUT_ROOT=root)
    run = launchers("train_full_8p.sh", [f"--data_path={data}", "--epochs=3", *TINY], env, tmp_path, root)
    run.wait_for("Epoch: [0]")
    os.kill(run.proc.pid, signal.SIGUSR1)
    code = run.wait(timeout=180)
    assert code == 75, run.output()
    assert processes_with(str(root)) == [], run.output()
    assert (root / "0" / "checkpoint.pth").is_file()
    assert "Preempted by SIGTERM" in (root / "0" / "train_0.log").read_text()


def run_at_a_terminal(argv, env, seen, timeout=300):
    """Run `argv` as the foreground job of a new terminal (a pty), press Ctrl-C there once `seen` is in its
    output, and return (exit code, everything the terminal showed)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a new session whose controlling terminal is the pty
        try:
            os.chdir(REPO)
            os.execvpe(argv[0], argv, env)
        finally:
            os._exit(127)
    shown, pressed, deadline = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: every process that had the terminal open has ended
                    break
                if not chunk:
                    break
                shown += chunk
            if not pressed and seen.encode() in shown:
                os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT to its foreground process group
                pressed = True
        else:
            os.killpg(pid, signal.SIGKILL)
            pytest.fail(f"still running after {timeout} s:\n{shown.decode(errors='replace')}")
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            assert time.monotonic() < deadline, shown.decode(errors="replace")
            time.sleep(0.1)
    finally:
        os.close(fd)
    assert pressed, shown.decode(errors="replace")
    return os.waitstatus_to_exitcode(done[1]), shown.decode(errors="replace")


def test_ctrl_c_at_a_terminal_during_set_up_is_one_line_and_the_previous_run_comes_back(data, tmp_path, launchers):
    # At a terminal, Ctrl-C reaches the launcher and the trainer (one process group); the launcher does not pass
    # that SIGINT on as well, which main.py, still setting up, would take as a second Ctrl-C (a traceback). The
    # launch wrote no run, so the run it had moved aside is put back.
    root = tmp_path / "output"
    previous = fake_previous_run(root / "0", FIRST_START)
    before = snapshot(previous)
    code, shown = run_at_a_terminal(["bash", os.path.join(REPO, "test", "train_full_1p.sh"), f"--data_path={data}",
                                     "--epochs=3", *TINY], clean_env(OUTPUT_ROOT=root), seen="Device:")
    assert code == 130, shown
    assert "Traceback" not in shown and shown.count("stopped by SIGINT during") == 1, shown
    assert "stopped by a signal before the first checkpoint: nothing to resume" in shown
    assert snapshot(root / "0") == before, shown
    assert [n for n in os.listdir(root) if n != "0"][0].startswith("0.failed-") and len(os.listdir(root)) == 2
    assert processes_with(str(root)) == []


# ---- item 2: validate first, move aside only for a launch that runs ------------------------------------------

def test_bad_data_path_is_one_error_line_and_the_previous_run_stays_in_place(tmp_path):
    # The old launcher moved output/0 to output/0.prev-<now> first, then started main.py (seconds of imports),
    # which refused the data set.
    data = tmp_path / "no_val"
    (data / "train" / "class_0").mkdir(parents=True)
    root = tmp_path / "output"
    previous = fake_previous_run(root / "0", FIRST_START)
    before = snapshot(previous)
    python, started = recording_python(tmp_path)
    proc = run_script("train_full_1p.sh", [f"--data_path={data}", "--epochs=1"],
                      env=clean_env(PYTHON=python, OUTPUT_ROOT=root), timeout=120)
    assert proc.returncode == 2
    with pytest.raises(layout.DataError) as main_says:
        layout.check_dataset_layout(str(data))
    assert_one_line_error(proc)
    assert proc.stderr.strip() == f"error: {main_says.value}"  # main.py's own line, word for word
    assert "missing 'val/'" in proc.stderr
    assert main_calls(started) == []  # main.py never started
    assert os.listdir(root) == ["0"] and snapshot(previous) == before  # not moved, not touched
    assert "moved" not in proc.stdout


def test_folder_of_a_running_run_is_not_moved(data, tmp_path):
    # The old launcher moved a folder whose run was still writing into it.
    root = tmp_path / "output"
    previous = fake_previous_run(root / "0", FIRST_START)
    (previous / ".lock").write_text("pid 4242 on somehost\n")
    before = snapshot(previous)
    python, started = recording_python(tmp_path)
    with open(previous / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running main.py holds it
        proc = run_script("train_full_1p.sh", [f"--data_path={data}"], env=clean_env(PYTHON=python, OUTPUT_ROOT=root),
                          timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc, f"{root / '0'} is in use by a running run (pid 4242 on somehost)")
    assert main_calls(started) == [] and os.listdir(root) == ["0"] and snapshot(previous) == before


@pytest.mark.parametrize("with_run_json", [True, False], ids=["run.json", "oldest-file"])
def test_previous_run_is_moved_to_a_name_with_its_own_start_time(data, tmp_path, with_run_json):
    # The old name was the time of the move: a folder kept for weeks said nothing of when its run was.
    root = tmp_path / "output"
    previous = fake_previous_run(root / "0", FIRST_START)
    if not with_run_json:  # a run stopped before training started: its oldest file says when
        (previous / "run.json").unlink()
        os.utime(previous / "DenseNet121_for_PyTorch_bs8_1p_acc.log", (FIRST_START, FIRST_START))
    before = snapshot(previous)
    python, started = recording_python(tmp_path)
    proc = run_script("train_full_1p.sh", [f"--data_path={data}"], env=clean_env(PYTHON=python, OUTPUT_ROOT=root),
                      timeout=120)
    assert_ok(proc)
    kept = root / f"0.prev-{stamp(FIRST_START)}"
    assert sorted(os.listdir(root)) == ["0", kept.name], os.listdir(root)
    assert snapshot(kept) == before  # a rename: the same files
    assert f"note: the previous run in {root / '0'} was moved to {kept}" in proc.stdout, proc.stdout
    assert len(main_calls(started)) == 1


def test_launch_that_main_py_refuses_puts_the_previous_run_back(data, tmp_path):
    # What only main.py can check (here an image size too small for the model) is found after the move: the old
    # launcher left the trained run at output/0.prev-<time> and an output/0 with one error in its log.
    root = tmp_path / "output"
    previous = fake_previous_run(root / "0", FIRST_START)
    before = snapshot(previous)
    proc = run_script("train_full_1p.sh", [f"--data_path={data}", "--epochs=1", *TINY, "--val-crop-size", "8"],
                      env=clean_env(OUTPUT_ROOT=root), timeout=300)
    assert proc.returncode == 2
    assert_one_line_error(proc, "--val-crop-size 8 is too small")
    assert snapshot(root / "0") == before  # back where the README says, the same files
    failed = [n for n in os.listdir(root) if n != "0"]
    assert len(failed) == 1 and re.fullmatch(r"0\.failed-\d{8}-\d{6}\.log", failed[0]), os.listdir(root)
    assert "--val-crop-size 8 is too small" in (root / failed[0]).read_text()  # this launch's log, kept
    assert f"the previous run is back in {root / '0'} (the log of this launch: {root / failed[0]})" in proc.stdout


# ---- item 3: a closed pipe -----------------------------------------------------------------------------------

def test_launcher_piped_into_head_still_writes_its_summary_and_curves(data, tmp_path):
    # `... | head -3`: the old launcher died of SIGPIPE (141) at its summary's echo; no curves were drawn.
    root = tmp_path / "output"
    status = tmp_path / "status"
    launcher = " ".join(map(str, ["bash", os.path.join(REPO, "test", "train_full_1p.sh"), f"--data_path={data}",
                                  "--epochs=1", *TINY, "--max-steps", "2"]))
    proc = subprocess.run(f"{{ {launcher}; echo $? > {status}; }} | head -3", shell=True, cwd=REPO,
                          env=clean_env(OUTPUT_ROOT=root), capture_output=True, text=True, timeout=600)
    assert len(proc.stdout.splitlines()) == 3
    assert status.read_text().strip() == "0", proc.stderr  # the trainer's status, not 141
    assert (root / "0" / "DenseNet121_for_PyTorch_bs8_1p_acc.log").is_file()
    assert (root / "0" / "DenseNet121_for_PyTorch_bs8_1p_acc_curves.png").is_file(), os.listdir(root / "0")
    assert "Traceback" not in proc.stderr, proc.stderr


# ---- item 4: the launcher's own flags in either spelling and form ------------------------------------------

@pytest.mark.parametrize("argv", [
    ["--data_path={data}"], ["--data-path={data}"], ["--data_path", "{data}"], ["--data-path", "{data}"]])
def test_data_path_in_every_spelling_and_form(data, tmp_path, argv):
    # The old launcher refused all but --data_path=DIR: "needs --data_path=/path/to/imagenet".
    python, started = recording_python(tmp_path)
    proc = run_script("train_full_1p.sh", [a.format(data=data) for a in argv],
                      env=clean_env(PYTHON=python, OUTPUT_ROOT=tmp_path / "output"), timeout=120)
    assert_ok(proc)
    calls = main_calls(started)
    assert len(calls) == 1 and f"--data-path {data} " in calls[0], calls
    assert str(data) not in calls[0].replace(f"--data-path {data} ", ""), calls[0]  # given to main.py once


@pytest.mark.parametrize("argv, expected", [
    (["--epochs=2"], "--epochs 2"), (["--epochs", "2"], "--epochs 2"),
    (["--device_id=3"], "--device_id 3"), (["--device_id", "3"], "--device_id 3"),
    (["--device-id=3"], "--device_id 3"), (["--device-id", "3"], "--device_id 3"),
    (["--recipe=step"], "--lr-scheduler step"), (["--recipe", "step"], "--lr-scheduler step"),
])
def test_launcher_flags_in_both_forms(data, tmp_path, argv, expected):
    python, started = recording_python(tmp_path)
    root = tmp_path / "output"
    proc = run_script("train_full_1p.sh", [f"--data_path={data}", *argv], env=clean_env(PYTHON=python, OUTPUT_ROOT=root),
                      timeout=120)
    assert_ok(proc)
    calls = main_calls(started)
    assert len(calls) == 1 and expected in calls[0], calls
    call = calls[0]
    if "epochs" in argv[0]:
        assert call.rindex("--epochs 2") > call.rindex("--epochs 60"), call  # after the launcher's default
    if "device" in argv[0]:
        assert f"--output-dir {root / '3'} " in call, call  # device 3 writes output/3/ (as the original)


@pytest.mark.parametrize("argv, message", [
    (["--data-path"], "--data-path needs a value: --data-path=/path/to/imagenet or --data-path /path/to/imagenet"),
    (["--data_path={data}", "--epochs", "--lr", "0.1"], "--epochs needs a value"),
    (["--data_path={data}", "--epochs", "ten"], "--epochs ten: expected a whole number of epochs"),
    (["--data_path={data}", "--epoch", "1"], "does not take --epoch: did you mean --epochs?"),
])
def test_launcher_flag_mistakes_are_one_line_before_anything_starts(data, tmp_path, argv, message):
    python, started = recording_python(tmp_path)
    root = tmp_path / "output"
    previous = fake_previous_run(root / "0", FIRST_START)
    before = snapshot(previous)
    proc = run_script("train_full_1p.sh", [a.format(data=data) for a in argv],
                      env=clean_env(PYTHON=python, OUTPUT_ROOT=root), timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc, message)
    assert main_calls(started) == [] and os.listdir(root) == ["0"] and snapshot(previous) == before


# ---- items 4, 5, 6 on one real run: space forms train; what the run names; the summary by grep ----------------

@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A real 1-epoch run, the launcher's own flags all in the space form."""
    root = tmp_path_factory.mktemp("finished") / "output"
    proc = run_script("train_full_1p.sh", ["--data-path", data, "--epochs", "1", "--recipe", "reference",
                                           "--device-id", "0", *TINY, "--max-steps", "2"],
                      env=clean_env(OUTPUT_ROOT=root), timeout=600)
    return proc, root / "0"


def test_space_form_flags_train(finished):
    proc, folder = finished
    assert_ok(proc)
    assert (folder / "checkpoint.pth").is_file() and (folder / "metrics.jsonl").read_text().count("\n") == 1


def test_finished_run_names_its_checkpoints_and_log_and_says_what_its_figures_are(finished):
    proc, folder = finished
    out = assert_ok(proc)
    named = dict(re.findall(r"^(Checkpoint|Best model|Log|Summary): (\S+)", out, re.M))
    assert named == {"Checkpoint": str(folder / "checkpoint.pth"), "Best model": str(folder / "model_best.pth"),
                     "Log": str(folder / "train_0.log"),
                     "Summary": str(folder / "DenseNet121_for_PyTorch_bs8_1p_acc.log")}, out
    assert all(os.path.isfile(path) for path in named.values())
    lines = out.splitlines()
    accuracy = [i for i, line in enumerate(lines) if line.startswith("Final Train Accuracy")]
    assert len(accuracy) == 1 and re.fullmatch(r"Final Train Accuracy : \d+\.\d{3}", lines[accuracy[0]]), out
    assert "the last epoch's validation Acc@1" in lines[accuracy[0] + 1]  # said right under it, and once
    assert out.count("the last epoch's validation Acc@1") == 1
    fps = [i for i, line in enumerate(lines) if line.startswith("Final Performance images/sec : ")]
    assert len(fps) == 1 and "steady-state" in lines[fps[0] + 1] and "not the original's formula" in lines[fps[0] + 1]
    assert "mean FPS" in lines[fps[0] + 1]  # the run summary's other figure, told apart


@pytest.mark.parametrize("mode", ["acc", "perf"])
def test_every_summary_key_greps_one_line(finished, mode):
    # The old summary's "ActualFPSWindow = steady state" made `grep ActualFPS` find two lines.
    proc, folder = finished
    assert_ok(proc)
    if mode == "perf":  # the performance launchers' summary (CompileTime) of the same run
        assert_ok(subprocess.run([sys.executable, os.path.join(REPO, "run_summary.py"), str(folder), "--mode", "perf"],
                                 capture_output=True, text=True, timeout=120))
    path = folder / f"DenseNet121_for_PyTorch_bs8_1p_{mode}.log"
    keys = [line.split(" = ", 1)[0] for line in path.read_text().splitlines()]
    for key in keys:
        found = subprocess.run(["grep", key, str(path)], capture_output=True, text=True).stdout.splitlines()
        # TrainingTime is also in E2ETrainingTime: both are the original's keys, which we keep as they are.
        expected = [line for line in path.read_text().splitlines()
                    if line.startswith(f"{key} = ") or (key == "TrainingTime" and line.startswith("E2ETrainingTime"))]
        assert found == expected, (key, found)
    # The original's keys in its order, then ours (one of them: which rate ActualFPS is).
    assert keys[:-1] == ORIGINAL_KEYS[:len(keys) - 1] and keys[-1] == "FPSWindow", keys
