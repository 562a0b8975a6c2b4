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
  * a rendezvous port already in use, and a stale RANK/WORLD_SIZE without MASTER_ADDR, are one line each.
"""
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from conftest import (LAUNCH_VARS, REPO, SMALL_RUN, assert_ok, assert_one_line_error, clean_env, free_port,
                      run_main, write_image_folder)

import main as main_lib  # noqa: E402  (conftest put the repo on sys.path)
import launch as launch_lib  # noqa: E402
from cli import UserError  # noqa: E402

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


def slurm_port(job_id):
    return 10000 + job_id % 20000  # the rule README: Clusters documents


def port_for_a_job():
    """A Slurm job id whose port is free now."""
    for job_id in range(os.getpid() % 20000 + 500000, 520000 + os.getpid() % 20000, 7):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", slurm_port(job_id)))
            except OSError:
                continue
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
    assert errors == [f"error: the rendezvous port {port} is already in use on this machine (another job, or a run "
                      f"still exiting): set MASTER_PORT to a free port (Slurm launches without it use 10000 + "
                      f"SLURM_JOB_ID % 20000)"], proc.stderr[-3000:]
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
