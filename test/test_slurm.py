"""Slurm launches, and launch mistakes that used to wait for peers or fail inside DDP.

  * Slurm's compressed node lists expand as Slurm documents them (unit tests);
  * the launch main.py reads from the environment: srun tasks, an salloc shell or sbatch script (one
    process), torchrun inside srun, the original's RANK_ID inside srun (unit tests on environments);
  * real srun-style launches through test/fake_slurm/srun (it starts --ntasks local processes with the
    variables srun sets, and no MASTER_*): 3 processes train together; test/train_slurm.sbatch with 2 tasks
    writes the same per-rank logs and summary as train_full_8p.sh; an salloc-style shell with
    SLURM_NTASKS=8 runs one process instead of waiting;
  * ranks started by hand with different --model, --batch-size or class folders stop at once, on every
    rank, with one line naming the difference (before: DDP's traceback, or silent training);
  * a rendezvous port already in use, and a stale RANK/WORLD_SIZE without MASTER_ADDR, are one line each;
  * issue "Clusters as they are run": loader workers from each srun task's own CPU share (SLURM_CPUS_PER_TASK,
    its binding), one rendezvous port per job step (two sruns of one allocation side by side), a task that
    sees only its own GPU (--gpus-per-task), launcher variables that cannot be read (one line naming the
    variable, before any work), and test/train_slurm.sbatch across a time limit: it requeues itself
    (test/fake_slurm/scontrol records the request), the requeued job resumes to the same metrics as an
    uninterrupted run, and a job that fails the same way twice is not requeued again.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types

import pytest
import torch

from conftest import (LAUNCH_VARS, REPO, SMALL_RUN, assert_ok, assert_one_line_error, clean_env, free_port,
                      run_main, write_image_folder)

import main as main_lib  # noqa: E402  (conftest put the repo on sys.path)
import launch as launch_lib  # noqa: E402
import device as device_lib  # noqa: E402
from cli import UserError  # noqa: E402
from device import Device, DeviceError  # noqa: E402

FAKE_SLURM = os.path.join(REPO, "test", "fake_slurm")
RUN = ["--model", "densenet121", *SMALL_RUN, "--epochs", "1", "--max-steps", "2"]
SLURM_VARS_PREFIX = ("SLURM_", "SLURMD_")


# ----------------------------------------------------------------------------
# Node lists
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, hosts", [
    ("node7", ["node7"]),
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),      # zero padding kept
    ("n[8-10]", ["n8", "n9", "n10"]),                                        # no padding: widths grow
    ("lx[098-101]", ["lx098", "lx099", "lx100", "lx101"]),
    ("a[1-2]-b[3-4]", ["a1-b3", "a1-b4", "a2-b3", "a2-b4"]),                 # several groups: first is outer
    ("rack[0-1]_blade[0-1]", ["rack0_blade0", "rack0_blade1", "rack1_blade0", "rack1_blade1"]),
    ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),                                 # text after a group
    ("tux[0-1,12],login,cn[3]", ["tux0", "tux1", "tux12", "login", "cn3"]),  # names and groups, commas
    ("a1 b[2-3]", ["a1", "b2", "b3"]),                                       # white space separates too
])
def test_slurm_node_lists_expand_as_slurm_documents(text, hosts):
    assert launch_lib.expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["gpu[01-", "gpu01]", "gpu[a-b]", "gpu[4-2]", "", "a[[1]]"])
def test_unreadable_node_list_is_a_user_error(text):
    with pytest.raises(UserError, match="cannot read the Slurm node list.*set MASTER_ADDR"):
        launch_lib.expand_hostlist(text)


def test_tasks_per_node():
    assert launch_lib.tasks_per_node("8(x2),4") == [8, 8, 4]
    assert launch_lib.tasks_per_node("3") == [3]
    assert launch_lib.tasks_per_node("odd") == []


# ----------------------------------------------------------------------------
# Which launch: from the environment alone
# ----------------------------------------------------------------------------

def srun_task(rank, ntasks, local, node, per_node, job_id="123456", nodes="gpu[07-08]", **extra):
    """The variables srun sets for one task of a step (and those of the allocation around it)."""
    env = {"SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": nodes, "SLURM_NODELIST": nodes, "SLURM_NNODES": "2",
           "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": nodes, "SLURM_STEP_NUM_TASKS": str(ntasks),
           "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(local),
           "SLURM_NODEID": str(node), "SLURM_STEP_TASKS_PER_NODE": per_node, "SLURM_TASKS_PER_NODE": per_node}
    env.update(extra)
    return env


def test_an_srun_task_is_a_slurm_launch():
    launch = launch_lib.launcher_env(env=srun_task(rank=11, ntasks=16, local=3, node=1, per_node="8(x2)"))
    assert launch == launch_lib.Launch(11, 3, 16, 8, "slurm", "gpu07", str(slurm_port(123456)))
    assert launch.master_port == "13456"
    # Uneven nodes: the local world size is this node's count.
    launch = launch_lib.launcher_env(env=srun_task(rank=9, ntasks=10, local=1, node=1, per_node="8,2"))
    assert (launch.local_world_size, launch.world_size) == (2, 10)
    # MASTER_ADDR/MASTER_PORT, when set, win over what the job implies.
    launch = launch_lib.launcher_env(env=srun_task(0, 2, 0, 0, "1(x2)", MASTER_ADDR="10.1.2.3", MASTER_PORT="29555"))
    assert (launch.master_addr, launch.master_port) == ("10.1.2.3", "29555")
    # The step's first node hosts task 0, even when the job's list starts elsewhere.
    launch = launch_lib.launcher_env(env=srun_task(0, 2, 0, 0, "2", SLURM_STEP_NODELIST="gpu[08]"))
    assert launch.master_addr == "gpu08"


def test_the_allocation_alone_is_one_process():
    # An salloc shell: the allocation's variables, no step.
    salloc = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "8", "SLURM_NPROCS": "8", "SLURM_JOB_NODELIST": "gpu[01-02]",
              "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "4(x2)"}
    assert launch_lib.launcher_env(env=salloc).style == "single"
    assert launch_lib.launcher_env(distributed_flag=True, env=salloc).style == "single"  # setup(): needs a launcher
    # An sbatch script: the batch step even has SLURM_PROCID=0 and SLURM_LOCALID=0, but srun has started nothing.
    batch = {**salloc, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_GTIDS": "0"}
    assert launch_lib.launcher_env(env=batch) == launch_lib.Launch(0, 0, 1, 1, "single")


def test_torchrun_and_rank_id_keep_priority_inside_srun():
    task = srun_task(rank=1, ntasks=2, local=0, node=1, per_node="1(x2)")
    torchrun = {**task, "RANK": "5", "LOCAL_RANK": "5", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8",
                "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}
    assert launch_lib.launcher_env(env=torchrun) == launch_lib.Launch(5, 5, 16, 8, "torchrun", "gpu07", "29500")
    rank_id = {**task, "RANK_ID": "3", "RANK_SIZE": "4"}
    launch = launch_lib.launcher_env(True, node_rank=1, nodes=2, env=rank_id)
    assert (launch.rank, launch.world_size, launch.style) == (7, 8, "rank_id")
    assert (launch.master_addr, launch.master_port) == (launch_lib.ORIGINAL_MASTER_ADDR, launch_lib.ORIGINAL_MASTER_PORT)


# ----------------------------------------------------------------------------
# Real launches through the fake srun
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("slurm") / "data", classes=3, train_per_class=4,
                              val_per_class=2, size=32)


def slurm_port(job_id, step_id=0):
    return 10000 + (job_id + 7919 * step_id) % 20000  # the rule README: Clusters documents


def port_is_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def port_for_a_job(steps=1):
    """A Slurm job id whose port is free now (the ports of its steps 0..steps-1)."""
    start = 500000 + (os.getpid() * 37 + time.monotonic_ns() // 1000) % 20000
    for job_id in range(start, start + 20000, 7):
        if all(port_is_free(slurm_port(job_id, step)) for step in range(steps)):
            return job_id, slurm_port(job_id)
    raise RuntimeError("no free port in Slurm's range")


def slurm_env(job_id, **extra):
    """This environment without launcher or Slurm variables, plus a Slurm allocation on loopback and the fake
    srun first on PATH. The node list is an address range, so that its first host resolves here."""
    env = {k: v for k, v in clean_env().items() if not k.startswith(SLURM_VARS_PREFIX)}
    env.update(SLURM_JOB_ID=str(job_id), SLURM_JOBID=str(job_id), SLURM_JOB_NODELIST="127.0.0.[1-2]",
               SLURM_NODELIST="127.0.0.[1-2]", SLURM_NNODES="1", SLURM_SUBMIT_DIR=REPO,
               PATH=FAKE_SLURM + os.pathsep + env["PATH"])
    env.update({k: str(v) for k, v in extra.items()})
    return env


def srun(ntasks, args, env, timeout=300):
    return subprocess.run(["srun", "-n", str(ntasks), "--kill-on-bad-exit=1", sys.executable,
                           os.path.join(REPO, "main.py"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_srun_three_tasks_train_together(data, tmp_path):
    job_id, port = port_for_a_job()
    out = tmp_path / "out"
    proc = srun(3, [*RUN, "--data-path", data, "--batch-size", "6", "--output-dir", str(out)], slurm_env(job_id))
    text = assert_ok(proc)
    for rank in range(3):  # every rank joined the same rendezvous: the first node, the job's port
        assert f"Joining the process group: rank {rank} of 3, gloo, rendezvous at 127.0.0.1:{port}" in text, text
    assert "world size 3; global batch 6 = 3 x 2" in text, text
    assert text.count("world size") == 1  # rank 0 logs; the others do not run a job of their own
    records = (out / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 1 and '"images": 12' in records[0]  # 2 steps x 3 ranks x 2 images
    assert " * Acc@1 " in text and "(6 images)" in text  # exact evaluation over the 3 ranks


def test_sbatch_script_on_two_tasks_writes_the_launchers_logs_and_summary(data, tmp_path):
    job_id, port = port_for_a_job()
    out = tmp_path / "output"
    # The batch step's environment: the allocation (2 nodes x 1 task), SLURM_PROCID=0, no step yet.
    env = slurm_env(job_id, SLURM_NNODES=2, SLURM_NTASKS=2, SLURM_NPROCS=2, SLURM_TASKS_PER_NODE="1(x2)",
                    SLURM_NTASKS_PER_NODE=1, SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_NODEID=0,
                    OUTPUT_ROOT=str(out))
    proc = subprocess.run(["bash", os.path.join(REPO, "test", "train_slurm.sbatch"), f"--data_path={data}",
                           "--epochs=1", "--model", "densenet121", *SMALL_RUN, "--batch-size", "4", "--max-steps",
                           "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert_ok(proc)
    log0, log1 = out / "0" / "train_0.log", out / "1" / "train_1.log"
    assert log0.is_file() and log1.is_file()
    text0 = log0.read_text()
    assert f"rendezvous at 127.0.0.1:{port}" in text0 and "world size 2; global batch 4 = 2 x 2" in text0
    assert "Joining the process group: rank 1 of 2" in log1.read_text()
    summary = dict(line.split(" = ", 1) for line in
                   (out / "0" / "DenseNet121_for_PyTorch_bs4_2p_acc.log").read_text().splitlines())
    assert summary["RankSize"] == "2" and summary["BatchSize"] == "4" and summary["DeviceType"] == "cpu"
    float(summary["TrainAccuracy"]), float(summary["ActualLoss"])  # from rank 0's metrics.jsonl
    assert not (out / "1" / "checkpoint.pth").exists() and (out / "0" / "checkpoint.pth").is_file()


def test_sbatch_script_uses_the_8p_launchers_recipe():
    def default_args(path):
        text = open(os.path.join(REPO, "test", path)).read()
        return re.search(r"^DEFAULT_ARGS=\((.*)\)$", text, re.M).group(1), \
            re.search(r"^DEFAULT_RECIPE=(\S+)$", text, re.M).group(1)
    assert default_args("train_slurm.sbatch") == default_args("train_full_8p.sh")


def test_salloc_shell_with_8_tasks_runs_one_process(data, tmp_path):
    # `salloc -n 8` then `python main.py` in its shell: one process runs; nobody waits for 7 peers.
    env = slurm_env(4242, SLURM_NTASKS=8, SLURM_NPROCS=8, SLURM_TASKS_PER_NODE="8")
    start = time.monotonic()
    proc = run_main([*RUN, "--data-path", data, "--batch-size", "4", "--output-dir", str(tmp_path / "out"),
                     "--dist-timeout", "120"], env=env, inherit_env=False, timeout=300)
    text = assert_ok(proc)
    assert time.monotonic() - start < 100
    assert "Joining the process group" not in text
    assert "SLURM_NTASKS=8, but this process was not started by srun: running as 1 process" in text, text
    assert "Device: cpu" in text and "; batch 4;" in text, text


def test_distributed_flag_in_an_salloc_shell_says_what_it_expects(monkeypatch):
    for name in [*LAUNCH_VARS, *(k for k in os.environ if k.startswith(SLURM_VARS_PREFIX))]:
        monkeypatch.delenv(name, raising=False)
    for name, value in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu01"}.items():
        monkeypatch.setenv(name, value)
    args = main_lib.get_args_parser().parse_args(["--synthetic", "--distributed", "--device", "cpu"])
    with pytest.raises(UserError, match=r"--distributed needs a launcher: torchrun \(sets RANK, LOCAL_RANK, "
                                        r"WORLD_SIZE\), srun \(one task per device\)"):
        launch_lib.setup(args, launch_lib.job_of(args))


# ----------------------------------------------------------------------------
# Rendezvous mistakes
# ----------------------------------------------------------------------------

def test_srun_port_in_use_is_one_line(data, tmp_path):
    job_id, port = port_for_a_job()
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", port))
        busy.listen()
        start = time.monotonic()
        proc = srun(2, [*RUN, "--data-path", data, "--batch-size", "4", "--output-dir", str(tmp_path / "out"),
                        "--dist-timeout", "300"], slurm_env(job_id), timeout=400)
        elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 120, f"took {elapsed:.0f} s"  # rank 0 fails at once, srun -K stops rank 1: no 300 s wait
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: the rendezvous port {port} is already in use on this machine, and this task "
                      f"(SLURM_PROCID=0) must host it: another task claims rank 0 too and holds the rendezvous (is "
                      f"SLURM_PROCID set by hand? srun gives each task its own), or another job or a run still "
                      f"exiting holds the port; otherwise set MASTER_PORT to a free port (Slurm launches without it "
                      f"use 10000 + (SLURM_JOB_ID + 7919 x SLURM_STEP_ID) % 20000)"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_rank_id_port_in_use_is_one_line(data, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_main([*RUN, "--data-path", data, "--batch-size", "4", "--output-dir", str(tmp_path / "out"),
                         "--distributed", "--dist-timeout", "30"],
                        env=clean_env(RANK_ID=0, RANK_SIZE=2, MASTER_PORT=port), inherit_env=False, timeout=120)
    assert_one_line_error(proc, f"error: the rendezvous port {port} is already in use on this machine")
    assert "MASTER_PORT to a free port" in proc.stderr and "Slurm" not in proc.stderr


def test_stale_rank_and_world_size_without_master_addr_is_one_line(data, tmp_path, rank=1):
    proc = run_main([*RUN, "--data-path", data, "--batch-size", "4", "--output-dir", str(tmp_path / "out")],
                    env=clean_env(RANK=rank, WORLD_SIZE=2), inherit_env=False, timeout=120)
    assert_one_line_error(proc, f"RANK={rank} and WORLD_SIZE=2 are set but MASTER_ADDR/MASTER_PORT are not, so "
                                f"this is no torchrun launch: unset RANK and WORLD_SIZE")
    assert "Joining the process group" not in proc.stdout  # refused before waiting for anyone


# ----------------------------------------------------------------------------
# Ranks that disagree
# ----------------------------------------------------------------------------

def hand_launch(per_rank_args, port, timeout=400):
    """The original's hand launch: one command per rank (RANK_ID/RANK_SIZE, --distributed), each with its own
    flags. All ranks' results, and the seconds until the last one ended."""
    n = len(per_rank_args)
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"), *args, "--distributed",
                               "--dist-timeout", "300"], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=clean_env(RANK_ID=r, RANK_SIZE=n, MASTER_PORT=port))
             for r, args in enumerate(per_rank_args)]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, err = p.communicate()
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results, time.monotonic() - start


def assert_every_rank_says(results, elapsed, message):
    assert elapsed < 120, f"took {elapsed:.0f} s"  # not --dist-timeout's 300 s
    for rank, proc in enumerate(results):
        assert_one_line_error(proc, message)
        assert proc.returncode == 2, (rank, proc.returncode)
        assert "Start training" not in proc.stdout and "Epoch:" not in proc.stdout


def test_ranks_with_different_models_stop_with_one_line(data, tmp_path):
    base = [*SMALL_RUN, "--data-path", data, "--batch-size", "4", "--epochs", "1", "--max-steps", "2"]
    results, elapsed = hand_launch([["--model", "densenet121", *base, "--output-dir", str(tmp_path / "o0")],
                                    ["--model", "densenet169", *base, "--output-dir", str(tmp_path / "o1")]],
                                   free_port())
    assert_every_rank_says(results, elapsed,
                           "error: ranks disagree on --model: rank 0 has densenet121; rank 1 has densenet169")


def test_ranks_with_different_batch_sizes_stop_with_one_line(data, tmp_path):
    # Before: trained together silently, ranks 0 and 2 with 4 images per step and rank 1 with 8.
    base = [*RUN, "--data-path", data]
    results, elapsed = hand_launch([[*base, "--batch-size", "12", "--output-dir", str(tmp_path / "o0")],
                                    [*base, "--batch-size", "24", "--output-dir", str(tmp_path / "o1")],
                                    [*base, "--batch-size", "12", "--output-dir", str(tmp_path / "o2")]], free_port())
    assert_every_rank_says(results, elapsed,
                           "error: ranks disagree on --batch-size: ranks 0,2 have 12; rank 1 has 24")


def test_ranks_with_different_class_folders_stop_with_one_line(data, tmp_path):
    # A node whose copy of the data set has a class more: DDP's size-mismatch traceback before.
    other = write_image_folder(tmp_path / "other", classes=4, train_per_class=4, val_per_class=2, size=32)
    base = [*RUN, "--batch-size", "4"]
    results, elapsed = hand_launch([[*base, "--data-path", data, "--output-dir", str(tmp_path / "o0")],
                                    [*base, "--data-path", other, "--output-dir", str(tmp_path / "o1")]], free_port())
    assert_every_rank_says(results, elapsed,
                           "error: ranks disagree on the number of classes: rank 0 has 3; rank 1 has 4")


# ============================================================================
# Clusters as they are run
# ============================================================================

SBATCH = os.path.join(REPO, "test", "train_slurm.sbatch")
# main.py's Device line says where its worker count came from once main.py prints Run.workers_from.
MAIN_SAYS_WHY = "workers_from" in open(os.path.join(REPO, "main.py")).read()


def children(pid):
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def kill_tree(pid):
    """SIGKILL a process and everything under it (a test that failed half-way leaves nothing running)."""
    for child in children(pid):
        kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_until(condition, timeout, what):
    """condition()'s first true value, polled every 50 ms; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def srun_tasks(parent, ntasks):
    """A condition: the `ntasks` tasks of the srun stand-in that `parent` (the sbatch script) runs, once started."""
    def tasks():
        for pid in children(parent):
            if "fake_slurm/srun" in cmdline(pid):
                found = children(pid)
                if len(found) == ntasks:
                    return found
        return None
    return tasks


def free_job_ids(count, steps=1):
    """`count` consecutive Slurm job ids whose ports (steps 0..steps-1) are all free now."""
    start = 500000 + (os.getpid() * 37 + time.monotonic_ns() // 1000) % 20000
    for first in range(start, start + 20000, 11):
        ids = list(range(first, first + count))
        if all(port_is_free(slurm_port(j, s)) for j in ids for s in range(steps)):
            return ids
    raise RuntimeError("no free ports in Slurm's range")


def sbatch_env(job_id, root, restart=None, **extra):
    """The batch step of a 1-node, 2-task allocation (what sbatch gives the script), with the fake srun and
    scontrol first on PATH; scontrol's requeue requests go to <root>.scontrol, each task's exit status to
    <root>.exits."""
    env = slurm_env(job_id, SLURM_NNODES=1, SLURM_NTASKS=2, SLURM_NPROCS=2, SLURM_TASKS_PER_NODE="2",
                    SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_NODEID=0, OUTPUT_ROOT=root,
                    FAKE_SCONTROL_LOG=f"{root}.scontrol", FAKE_SRUN_EXIT_LOG=f"{root}.exits", **extra)
    if restart is not None:
        env["SLURM_RESTART_COUNT"] = str(restart)
    return env


def start_sbatch(args, env):
    return subprocess.Popen(["bash", SBATCH, *map(str, args)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=400):
    """The CompletedProcess of a Popen; on a timeout its whole process tree is killed first."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s\n--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def script_lines(proc):
    """What the sbatch script itself said on stderr (its lines start with error: or note:; the tasks' own
    start-up and stop lines do not)."""
    return [line for line in proc.stderr.splitlines() if line.startswith(("error:", "note:"))]


# ----------------------------------------------------------------------------
# 1. Loader workers from each srun task's own CPUs
# ----------------------------------------------------------------------------

@pytest.fixture
def machine(monkeypatch):
    """A pretend machine: set("cpus", n) and ("affinity", n) (this process's share)."""
    state = {"cpus": 96, "affinity": 96}
    monkeypatch.setattr(os, "cpu_count", lambda: state["cpus"])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(state["affinity"])), raising=False)
    return state


def test_srun_tasks_count_workers_from_their_own_share(machine):
    # Old: cores // ranks on the node - 1 for everyone: 8 srun tasks bound to 12 CPUs each got 12 // 8 - 1 = 0.
    machine["affinity"] = 12  # srun bound this task to its 12 CPUs of the node's 96
    assert launch_lib.default_workers(8, env={}, launcher="slurm") == (11, "this task is bound to 12 CPUs of 96")
    assert launch_lib.default_workers(8, env={"SLURM_CPUS_PER_TASK": "12"}, launcher="slurm") == \
        (11, "SLURM_CPUS_PER_TASK=12")
    # Never more than the CPUs the task may run on: an allocation of 24 but a binding to 12.
    assert launch_lib.default_workers(8, env={"SLURM_CPUS_PER_TASK": "24"}, launcher="slurm") == \
        (11, "SLURM_CPUS_PER_TASK=24, but this task is bound to 12 CPUs")
    machine["affinity"] = 1   # 8 tasks bound to 1 CPU each: loading in the trainer
    assert launch_lib.default_workers(8, env={}, launcher="slurm") == (0, "this task is bound to 1 CPU of 96")
    # Not bound (every task sees the whole node) and no --cpus-per-task: the node's CPUs, shared.
    machine["affinity"] = 96
    assert launch_lib.default_workers(8, env={}, launcher="slurm") == (11, "96 CPUs / 8 tasks on this node")
    assert launch_lib.default_workers(8, env={"SLURM_CPUS_PER_TASK": "12"}, launcher="slurm")[0] == 11
    # A job's cgroup alone (96 of a 128-CPU node, tasks not bound): every task sees the same 96, to share.
    machine["cpus"] = 128
    assert launch_lib.default_workers(8, env={"SLURM_CPUS_ON_NODE": "96"}, launcher="slurm") == \
        (11, "96 CPUs / 8 tasks on this node")
    machine["affinity"] = 12  # the same job with srun binding each task to its 12
    assert launch_lib.default_workers(8, env={"SLURM_CPUS_ON_NODE": "96"}, launcher="slurm") == \
        (11, "this task is bound to 12 CPUs of 96 for the job on this node")


def test_ranks_of_one_launcher_share_its_cpus(machine):
    # torchrun started by srun with --cpus-per-task=96: SLURM_CPUS_PER_TASK is torchrun's share, which its 8
    # ranks split (95 workers each would run 760 decoders on 96 CPUs).
    env = {"SLURM_CPUS_PER_TASK": "96"}
    assert launch_lib.default_workers(8, env=env, launcher="torchrun") == (11, "96 CPUs / 8 ranks on this node")
    machine["affinity"] = 16  # a container or taskset: 16 CPUs for torchrun and all its ranks
    assert launch_lib.default_workers(8, env=env, launcher="torchrun") == (1, "16 CPUs / 8 ranks on this node")
    assert launch_lib.default_workers(1, env=env) == (15, "16 CPUs")
    assert launch_lib.default_workers(1, env={}) == (15, "16 CPUs")


def test_unreadable_cpu_counts_are_a_user_error(machine):
    for name in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        for value in ("", "twelve", "0"):
            with pytest.raises(UserError, match=rf"^{name}=") as e:
                launch_lib.default_workers(8, env={name: value}, launcher="slurm")
            assert "\n" not in str(e.value)


# (one write per task: two tasks share the pipe, and an unbuffered print writes the line and its newline apart)
WORKERS_PY = ("import json, sys, launch; job = launch.launcher_env(); sys.stdout.write(json.dumps([job.rank, "
              "*launch.default_workers(job.local_world_size, launcher=job.style)]) + '\\n')")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="binding a task to fewer CPUs needs 2 or more")
def test_each_bound_srun_task_counts_its_own_cpus():
    # Real tasks, really bound: by taskset around srun (each task inherits CPU 0), and by srun --cpu-bind=cores
    # (task 0 on the first CPU, task 1 on the second). Each works out its own share.
    env = slurm_env(4242, PYTHONPATH=REPO)
    cpus = os.cpu_count()

    def step(*command):
        proc = subprocess.run([*command, sys.executable, "-c", WORKERS_PY], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
        assert len(lines) == 2, proc.stdout + proc.stderr
        return sorted(json.loads(line) for line in lines)
    expected = [[rank, 0, f"this task is bound to 1 CPU of {cpus}"] for rank in (0, 1)]
    assert step("taskset", "-c", "0", "srun", "-n", "2") == expected
    assert step("srun", "-n", "2", "--cpu-bind=cores") == expected


def test_two_steps_of_one_job_train_side_by_side(data, tmp_path):
    # Old: every step of a job used 10000 + SLURM_JOB_ID % 20000, so a second srun in the allocation found the
    # port taken (or joined the first step's rendezvous); and workers came from cores // ranks - 1 = 0.
    # Step 0: srun -c 2 (SLURM_CPUS_PER_TASK=2, tasks not bound): 1 worker each. Step 1: srun --cpu-bind=cores,
    # each task bound to one CPU: 0 workers. Both at once, on the ports of their steps.
    job_id = free_job_ids(1, steps=2)[0]
    args = [a for i, a in enumerate(RUN) if "--workers" not in (a, RUN[i - 1])]  # the default number of workers
    steps = []
    for step, options in ((0, ["-c", "2"]), (1, ["--cpu-bind=cores"])):
        env = slurm_env(job_id, FAKE_SRUN_STEP_ID=step)
        steps.append(subprocess.Popen(
            ["srun", "-n", "2", *options, "--kill-on-bad-exit=1", sys.executable, os.path.join(REPO, "main.py"),
             *args, "--data-path", data, "--batch-size", "4", "--output-dir", str(tmp_path / f"step{step}")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = [finish(p, timeout=400) for p in steps]
    finally:
        for p in steps:
            kill_tree(p.pid)
    cpus = os.cpu_count()
    for step, (proc, workers, why) in enumerate(zip(results, (1, 0), ("SLURM_CPUS_PER_TASK=2",
                                                                      f"this task is bound to 1 CPU of {cpus}"))):
        text = assert_ok(proc)
        port = slurm_port(job_id, step)
        for rank in (0, 1):
            assert f"Joining the process group: rank {rank} of 2, gloo, rendezvous at 127.0.0.1:{port}" in text, text
        device = [line for line in text.splitlines() if line.startswith("Device:")]
        assert len(device) == 1 and f"; workers {workers} per process" in device[0], device
        if MAIN_SAYS_WHY:
            assert device[0].endswith(f"; workers {workers} per process ({why})"), device
        assert (tmp_path / f"step{step}" / "metrics.jsonl").is_file()
    assert slurm_port(job_id, 0) != slurm_port(job_id, 1)


# ----------------------------------------------------------------------------
# 2. One rendezvous port per job step
# ----------------------------------------------------------------------------

def test_each_step_of_a_job_has_its_own_port_in_range():
    for job_id in (0, 1, 4242, 123456, 19999, 20000, 987654321):
        assert slurm_port(job_id) == launch_lib.slurm_port(job_id) == 10000 + job_id % 20000  # step 0 as before
        ports = [launch_lib.slurm_port(job_id, step) for step in range(200)]
        assert len(set(ports)) == len(ports)  # the steps of one job never collide
        assert all(10000 <= p <= 29999 for p in ports)  # below the ephemeral ports (32768 and up)
        # Neighbouring jobs (a job array, a user's jobs in a row) sharing a node: their first steps do not collide.
        near = {launch_lib.slurm_port(job_id + d, 0) for d in range(-300, 301)}
        assert not near & {launch_lib.slurm_port(job_id, step) for step in range(1, 10)}
    task = srun_task(rank=1, ntasks=2, local=1, node=0, per_node="2", SLURM_STEP_ID="3")
    assert launch_lib.launcher_env(env=task).master_port == str(10000 + (123456 + 7919 * 3) % 20000)


# ----------------------------------------------------------------------------
# 3. A task that sees only its own GPU (--gpus-per-task)
# ----------------------------------------------------------------------------

@pytest.fixture
def visible_gpus(monkeypatch):
    """torch.cuda as a task sees it: state["count"] visible GPUs; bound: the indices set_device was given."""
    state, bound = {"count": 8}, []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["count"])
    monkeypatch.setattr(torch.accelerator, "set_device_index", bound.append)
    return state, bound


def test_a_task_that_sees_only_its_own_gpu_binds_it(visible_gpus):
    # Old: local rank 3 asked for cuda:3 and failed: "only 1 cuda device(s) are visible".
    state, bound = visible_gpus
    state["count"] = 1  # srun --gpus-per-task=1: this task's CUDA_VISIBLE_DEVICES holds its own GPU only
    assert device_lib.resolve_device("cuda", local_rank=3) == Device("cuda", 0)
    assert bound == [0]
    state["count"] = 8  # --gpus-per-node: every task sees the node's 8, local rank r takes r
    assert device_lib.resolve_device("cuda", local_rank=3) == Device("cuda", 3)
    assert device_lib.resolve_device("cuda", local_rank=1, device_ids=[4, 5]) == Device("cuda", 5)  # --device_ids
    assert bound == [0, 3, 5]
    with pytest.raises(DeviceError, match="--device_ids 0,1 names 2 device"):
        device_lib.resolve_device("cuda", local_rank=3, device_ids=[0, 1])
    with pytest.raises(DeviceError, match="wants cuda:9 but only 8"):
        device_lib.resolve_device("cuda", local_rank=0, device_ids=[9])


def test_an_npu_task_that_sees_only_its_own_npu_binds_it(monkeypatch):
    # The same on Ascend, where ASCEND_RT_VISIBLE_DEVICES shows each task its own NPU.
    bound = []
    npu = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1, set_device=bound.append)
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    monkeypatch.setattr(device_lib, "_import_torch_npu", lambda: True)
    get_module = torch.get_device_module
    monkeypatch.setattr(torch, "get_device_module", lambda kind=None: npu if kind == "npu" else get_module(kind))
    monkeypatch.setattr(torch.accelerator, "set_device_index", bound.append)
    assert device_lib.resolve_device("npu", local_rank=5) == Device("npu", 0)
    assert bound == [0]


# ----------------------------------------------------------------------------
# 5. Launcher variables that cannot be read
# ----------------------------------------------------------------------------

def task_env(**changes):
    """Task 0 of a 2-task step on one node, with `changes` (None removes a variable)."""
    env = srun_task(rank=0, ntasks=2, local=0, node=0, per_node="2", nodes="127.0.0.1")
    env.update(changes)
    return {k: v for k, v in env.items() if v is not None}


TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500"}


@pytest.mark.parametrize("env, distributed, message", [
    (task_env(SLURM_STEP_NUM_TASKS=""), False, "SLURM_STEP_NUM_TASKS='' is not a whole number"),
    (task_env(SLURM_STEP_NUM_TASKS="0"), False, "SLURM_STEP_NUM_TASKS=0 must be 1 or more"),
    (task_env(SLURM_NODEID="node3"), False, "SLURM_NODEID='node3' is not a whole number"),
    (task_env(SLURM_NODEID="1"), False, "SLURM_NODEID=1 is out of range for SLURM_STEP_TASKS_PER_NODE=2: it must be "
                                        "0..0"),
    (task_env(SLURM_PROCID="2"), False, "SLURM_PROCID=2 is out of range for SLURM_STEP_NUM_TASKS=2: it must be 0..1"),
    (task_env(SLURM_PROCID="-1"), False, "SLURM_PROCID=-1 must be 0 or more"),
    (task_env(SLURM_LOCALID="2"), False, "SLURM_LOCALID=2 is out of range for SLURM_STEP_TASKS_PER_NODE=2"),
    (task_env(SLURM_JOB_ID="abc"), False, "SLURM_JOB_ID='abc' is not a whole number"),
    (task_env(SLURM_STEP_ID="batch"), False, "SLURM_STEP_ID='batch' is not a whole number"),
    ({**TORCHRUN, "RANK": "2"}, False, "RANK=2 is out of range for WORLD_SIZE=2: it must be 0..1"),
    ({**TORCHRUN, "WORLD_SIZE": "two"}, False, "WORLD_SIZE='two' is not a whole number"),
    ({**TORCHRUN, "LOCAL_RANK": "2"}, False, "LOCAL_RANK=2 is out of range for LOCAL_WORLD_SIZE=2"),
    ({**TORCHRUN, "LOCAL_WORLD_SIZE": "3"}, False, "LOCAL_WORLD_SIZE=3 is more than WORLD_SIZE=2"),
    ({"RANK_ID": "8", "RANK_SIZE": "8"}, True, "RANK_ID=8 is out of range for RANK_SIZE=8: it must be 0..7"),
    ({"RANK_ID": "0", "RANK_SIZE": "two"}, True, "RANK_SIZE='two' is not a whole number"),
])
def test_unreadable_launcher_variables_are_one_line_naming_them(env, distributed, message):
    # Old: ValueError or ZeroDivisionError tracebacks, or a rank that could not exist waiting --dist-timeout.
    with pytest.raises(UserError) as e:
        launch_lib.launcher_env(distributed, env=env)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_readable_launcher_variables_still_launch():
    assert launch_lib.launcher_env(env=task_env(SLURM_PROCID=" 1 ", SLURM_LOCALID="1")).rank == 1
    assert launch_lib.launcher_env(env={"RANK_ID": "two", "RANK_SIZE": "8"}).style == "single"  # no --distributed
    with pytest.raises(UserError, match="--dist_rank 2 is not a node of --world-size 2"):
        launch_lib.launcher_env(True, node_rank=2, nodes=2, env={"RANK_ID": "0", "RANK_SIZE": "8"})


@pytest.mark.parametrize("variables, message", [  # (the others take the same path: the unit test above)
    ({"SLURM_STEP_NUM_TASKS": ""}, "error: SLURM_STEP_NUM_TASKS='' is not a whole number (srun sets it"),
    ({"SLURM_PROCID": "2"}, "error: SLURM_PROCID=2 is out of range for SLURM_STEP_NUM_TASKS=2: it must be 0..1"),
])
def test_main_refuses_unreadable_slurm_variables_before_any_work(data, tmp_path, variables, message):
    # Old: tracebacks (ValueError, ZeroDivisionError), and SLURM_PROCID=2 of 2 waited the whole --dist-timeout.
    out = tmp_path / "out"
    env = slurm_env(4242, **task_env(SLURM_JOB_ID="4242", **variables))
    start = time.monotonic()
    proc = run_main([*RUN, "--data-path", data, "--batch-size", "4", "--output-dir", str(out), "--dist-timeout",
                     "300"], env=env, inherit_env=False, timeout=200)
    assert time.monotonic() - start < 100
    assert_one_line_error(proc, message)
    assert proc.returncode == 2 and "Joining the process group" not in proc.stdout
    assert not out.exists()  # before any work


def test_two_tasks_claiming_rank_0_are_told_so(data, tmp_path):
    # Old: the second was told only "port already in use (another job, or a run still exiting)".
    job_id, port = port_for_a_job()
    env = slurm_env(job_id, **task_env(SLURM_JOB_ID=str(job_id)))
    args = [*RUN, "--data-path", data, "--batch-size", "4", "--dist-timeout", "120"]
    log = tmp_path / "first.log"
    first = subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"), *args, "--output-dir",
                              str(tmp_path / "o1"), "--log-file", str(log)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: log.is_file() and "Joining the process group: rank 0 of 2" in log.read_text(), 120,
                   "the first rank 0 to join")
        wait_until(lambda: not port_is_free(port), 60, "the first rank 0 to host the rendezvous")
        second = run_main([*args, "--output-dir", str(tmp_path / "o2")], env=env, inherit_env=False, timeout=120)
    finally:
        first.send_signal(signal.SIGTERM)
        try:
            first.wait(60)
        except subprocess.TimeoutExpired:
            kill_tree(first.pid)
    assert_one_line_error(second, f"error: the rendezvous port {port} is already in use on this machine, and this "
                                  f"task (SLURM_PROCID=0) must host it: another task claims rank 0 too")
    assert second.returncode == 2


def test_8p_launcher_with_an_unreadable_rank_size_is_one_line(data, tmp_path):
    # Old: the shell's "integer expression expected", then 1 process trained with the 8-device recipe, exit 0.
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(REPO, "test", "train_full_8p.sh"), f"--data_path={data}",
                           "--epochs=1", "--model", "densenet121", *SMALL_RUN, "--batch-size", "4", "--max-steps",
                           "1"], cwd=REPO, env=clean_env(RANK_SIZE="two", OUTPUT_ROOT=out), capture_output=True,
                          text=True, timeout=300)
    assert_one_line_error(proc, "error: RANK_SIZE='two'")
    assert proc.returncode == 2 and not (out / "0" / "metrics.jsonl").exists()


def test_sbatch_checks_main_flags_once_before_starting_anything(data, tmp_path):
    # Old: srun started every task, each printed main.py's error, then "training exited with status 143; see
    # .../train_0.log", a log that did not exist.
    out = tmp_path / "out"
    env = sbatch_env(4242, out)
    for flags, message in ((["--modle", "densenet121"], "error: unknown flag --modle: did you mean --model? (see "
                                                         "main.py --help)"),
                           (["--batch-size", "5"], "error: --batch-size 5 is the global batch and must divide "
                                                   "evenly among 2 ranks")):
        proc = subprocess.run(["bash", SBATCH, f"--data_path={data}", "--epochs=1", *flags], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=200)
        assert_one_line_error(proc, message)
        assert proc.returncode == 2
        assert not out.exists() and not os.path.exists(f"{out}.exits")  # no srun, no rank folder, no log


# ----------------------------------------------------------------------------
# 4. Unattended requeue across a time limit
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def init_weights(tmp_path_factory):
    """One set of starting weights for every run that must reproduce another (--pretrained_weight_path)."""
    import densenet
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("init") / "densenet121_3_classes.pth"
    torch.save(densenet.densenet121(num_classes=3).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def data24(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("slurm24") / "data", classes=3, train_per_class=8,
                              val_per_class=2, size=32)


METRICS_COMPARED = ("train_loss", "train_acc1", "train_acc5", "images", "last_loss", "val_loss", "val_acc1",
                    "val_acc5", "val_images")


def metrics_rows(root):
    with open(os.path.join(root, "0", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_across_a_time_limit(data, init, tmp_path, batch, epochs, signal_after):
    """Play the scheduler: attempt 1 of the job gets the time limit's SIGTERM (every task) once rank 0's log shows
    `signal_after`; the script must requeue it; attempt 2 (SLURM_RESTART_COUNT=1) must resume and finish. An
    uninterrupted run of the same flags (another job) runs meanwhile. Returns (attempt 1, attempt 2, the
    uninterrupted run, the job id, the output roots)."""
    job_id, other_job = free_job_ids(2)
    flags = [f"--data_path={data}", f"--epochs={epochs}", "--model", "densenet121", *SMALL_RUN, "--batch-size",
             batch, "--lr", "0.05", "--deterministic", "--pretrained", "--pretrained_weight_path", init]
    root, base_root = tmp_path / "run", tmp_path / "uninterrupted"
    baseline = start_sbatch(flags, sbatch_env(other_job, base_root))
    first = start_sbatch(flags, sbatch_env(job_id, root))
    try:
        log0 = root / "0" / "train_0.log"
        wait_until(lambda: log0.is_file() and signal_after in log0.read_text(), 300, f"{signal_after!r} in train_0.log")
        for task in wait_until(srun_tasks(first.pid, 2), 30, "the srun stand-in's 2 tasks"):
            os.kill(task, signal.SIGTERM)  # Slurm's --signal=TERM@120: every task of the step
        first = finish(first)
        second = subprocess.run(["bash", SBATCH, *map(str, flags)], cwd=REPO, env=sbatch_env(job_id, root, restart=1),
                                capture_output=True, text=True, timeout=400)
        baseline = finish(baseline)
    finally:
        for p in (first, baseline):
            if isinstance(p, subprocess.Popen):
                kill_tree(p.pid)
    return first, second, baseline, job_id, root, base_root


# "epoch end": a stop at an epoch's end across a requeue; "mid-epoch" (the default scenario) is the one run by
# the suite: the epoch-end stop and its resume are covered by test_stop.py and test_trust.py on every launcher.
@pytest.mark.parametrize("where", ["mid-epoch"])
def test_sbatch_requeues_itself_across_a_time_limit_and_finishes_as_if_uninterrupted(data, data24, init_weights,
                                                                                   tmp_path, where):
    # Old: the script said "submit again with --resume auto" and stopped: nothing continued unattended.
    if where == "epoch end":  # 12 images, a global batch of 12: 1 step per epoch, so the stop comes at an epoch end
        first, second, baseline, job_id, root, base_root = run_across_a_time_limit(
            data, init_weights, tmp_path, 12, 3, "Epoch: [0]  [1/1]")
    else:  # 24 images, batch 4: 6 steps per epoch, stopped a step or two after the first
        first, second, baseline, job_id, root, base_root = run_across_a_time_limit(
            data24, init_weights, tmp_path, 4, 1, "Epoch: [0]  [1/6]")
    # Attempt 1: every task saved and exited 75 (none stopped early), and the script asked for a requeue.
    assert first.returncode == 75, first.stderr[-4000:]
    exits = [line.split(" at ")[0] for line in open(f"{root}.exits").read().splitlines()]  # attempt 1's, then 2's
    assert sorted(exits[:2]) == ["step 0 task 0 status 75", "step 0 task 1 status 75"], exits
    assert sorted(exits[2:]) == ["step 0 task 0 status 0", "step 0 task 1 status 0"], exits
    assert (root / "0" / "checkpoint.pth").is_file()
    assert open(f"{root}.scontrol").read() == f"requeue {job_id}\n"
    [note] = script_lines(first)
    position = re.search(r"\(status 75; checkpoint: (epoch \d+ step \d+.*)\): requeued", note).group(1)
    assert note.startswith(f"note: attempt 1 of job {job_id} was stopped by a signal") and \
        note.endswith("requeued; attempt 2 resumes from the checkpoint"), note
    assert (position.endswith("step 0 (not evaluated)") or position.endswith("step 0")) == (where == "epoch end"), \
        position
    # Attempt 2: resumed by itself, in the same folders (nothing moved aside), and finished; no requeue asked.
    text = assert_ok(second)
    assert open(f"{root}.scontrol").read() == f"requeue {job_id}\n"
    assert not [p for p in os.listdir(root) if ".prev-" in p]
    assert f"Resumed from {root / '0' / 'checkpoint.pth'}" in text
    for rank in (0, 1):  # each rank's log holds both attempts, in order, each headed by its attempt number
        log = (root / str(rank) / f"train_{rank}.log").read_text()
        one = log.index(f"==== Slurm job {job_id}, attempt 1 (SLURM_RESTART_COUNT=0)")
        two = log.index(f"==== Slurm job {job_id}, attempt 2 (SLURM_RESTART_COUNT=1)")
        assert one < log.index(f"Joining the process group: rank {rank} of 2") < two
        assert log.index(f"Joining the process group: rank {rank} of 2", two) > two
    attempts = (root / "0" / "slurm_attempts.log").read_text().splitlines()
    assert len(attempts) == 1 and attempts[0].startswith(f"job={job_id} attempt=1 status=75 checkpoint={position}")
    # The same metrics as the uninterrupted run, exactly (--deterministic, --workers 0, the same starting weights).
    assert_ok(baseline)
    rows, expected = metrics_rows(root), metrics_rows(base_root)
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in expected] == list(range(len(rows)))
    for row, want in zip(rows, expected):
        assert {k: row[k] for k in METRICS_COMPARED} == {k: want[k] for k in METRICS_COMPARED}, row["epoch"]


def test_a_job_that_fails_the_same_way_twice_is_not_requeued_again(data, tmp_path):
    # Old: no requeue at all. A requeueing script must not requeue forever: here every attempt is stopped during
    # start-up (a time limit shorter than the set-up), so no attempt ever saves anything.
    job_id = free_job_ids(1)[0]
    root = tmp_path / "run"
    flags = [f"--data_path={data}", "--epochs=1", "--model", "densenet121", *SMALL_RUN, "--batch-size", "4"]
    requeues = f"{root}.scontrol"

    def attempt(restart, **extra):
        proc = start_sbatch(flags, sbatch_env(job_id, root, restart, **extra))
        try:
            for task in wait_until(srun_tasks(proc.pid, 2), 120, "the srun stand-in's 2 tasks"):
                os.kill(task, signal.SIGTERM)
            return finish(proc, timeout=120)
        finally:
            kill_tree(proc.pid)

    first = attempt(None)  # the first failure: requeued (it may be a passing problem)
    assert first.returncode == 143 and "Traceback" not in first.stderr
    [note] = script_lines(first)
    assert note.startswith(f"note: attempt 1 of job {job_id} had a task end by SIGTERM") and \
        "(status 143; checkpoint: none): requeued; attempt 2 resumes" in note, note
    assert open(requeues).read() == f"requeue {job_id}\n"

    second = attempt(1)  # the same failure at the same checkpoint: stopped, with one line
    assert second.returncode == 143 and "Traceback" not in second.stderr
    [error] = script_lines(second)
    assert error.startswith(f"error: attempt 2 of job {job_id} had a task end by SIGTERM") and \
        "(status 143; checkpoint: none), as attempt 1 did, without progress: not requeued again" in error, error
    seen = re.search(r"; see (\S+) ", error).group(1)
    assert os.path.isfile(seen), error  # only a log that exists
    assert open(requeues).read() == f"requeue {job_id}\n"

    third = attempt(3, MAX_REQUEUES=3)  # and whatever happens, at most MAX_REQUEUES requeues
    [error] = script_lines(third)
    assert error.startswith(f"error: attempt 4 of job {job_id}") and \
        ": not requeued, the job was requeued MAX_REQUEUES=3 times already" in error, error
    assert open(requeues).read() == f"requeue {job_id}\n"
