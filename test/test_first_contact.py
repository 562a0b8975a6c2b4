"""First contact (issue 20, and issue 18 item 11's launcher part): what a new user and a hostile tester hit
first. Typos in launcher and main.py flags, arguments that waste a run, a mismatched torch/torchvision pair,
what the launchers say when a run is stopped by a signal or cannot start torchrun, the summary of an epoch too
short for a steady state, and the README's first commands. Real launchers, real processes, real signals."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata

import pytest
import torch

from conftest import (REPO, SMALL_RUN, assert_ok, assert_one_line_error, clean_env, free_port, recording_python, run_main,
                      run_script, write_image_folder)

import cli
import densenet
import config
import launch
import main as main_lib
import run_summary

TINY = [*SMALL_RUN, "--model", "densenet121", "--batch-size", "8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes x 8 training images: 3 steps an epoch at batch 8."""
    return write_image_folder(tmp_path_factory.mktemp("first_contact") / "data", size=32)


def logged_python(tmp_path):
    """A PYTHON that is the real one but writes each command line to calls.txt first."""
    calls = tmp_path / "calls.txt"
    script = tmp_path / "python"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {sys.executable} "$@"\n')
    script.chmod(0o755)
    return script, calls


def start_and_interrupt(tmp_path, script, args, env, seen, timeout=600):
    """Start a launcher in its own process group, wait until `seen` is in its output, then press Ctrl-C (SIGINT
    to the whole foreground group, as a terminal does). Returns (exit code, stdout, stderr)."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(["bash", os.path.join(REPO, "test", script), *map(str, args)], cwd=REPO, env=env,
                                stdout=o, stderr=e, start_new_session=True)
    deadline = time.monotonic() + timeout
    while seen not in out.read_text():
        assert proc.poll() is None, f"ended before {seen!r}:\n{out.read_text()}\n{err.read_text()}"
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return code, out.read_text(), err.read_text()


def named_logs_exist(text):
    """Every train_<rank>.log path that the text names exists."""
    for path in re.findall(r"(/\S*train_\d+\.log)", text):
        assert os.path.isfile(path), f"names {path}, which does not exist:\n{text}"


# Item 1: a launcher typo starts the full run --------------------------------------------------------------

@pytest.mark.parametrize("typo, suggestion", [("--epoch=1", "--epochs=1"), ("--batchsize=16", "--batch-size 16"),
                                              ("--learning_rate=0.1", "--lr 0.1"), ("--train_epochs=2", "--epochs=2")])
def test_launcher_refuses_a_typo_before_anything_starts(data, tmp_path, typo, suggestion):
    # The old launcher warned "ignored launcher argument(s) ... --epoch=1" and started the 60-epoch run.
    python, started = recording_python(tmp_path)
    root = tmp_path / "output"
    proc = run_script("train_full_1p.sh", [f"--data_path={data}", typo],
                      env=clean_env(PYTHON=python, OUTPUT_ROOT=root), timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc, f"does not take {typo}: did you mean {suggestion}?")
    assert not started.exists(), started.read_text()  # main.py never started
    assert not root.exists()  # no folder made, no previous run moved


def test_launcher_ignores_only_the_modelzoo_harness_arguments(data, tmp_path):
    # The arguments ModelZoo's harness passes (listed in common.sh with where they come from) are ignored as
    # the original ignores them, with one note; main.py starts and never sees them.
    python, started = recording_python(tmp_path)
    harness = ["--conda_name=py38", "--precision_mode=O2", "--profiling=False", "--over_dump=False",
               "--data_dump_flag=False", "--data_dump_step=10", "--bin_mode=1", "--fp32=True", "--hf32=True",
               "--ckpt_path=/x", "--batch_size=64"]
    proc = run_script("train_performance_1p.sh", [f"--data_path={data}", *harness, "--workers=0"],
                      env=clean_env(PYTHON=python, OUTPUT_ROOT=tmp_path / "output"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith("note: ignored the ModelZoo harness's"), proc.stderr
    assert all(arg in notes[0] for arg in harness), notes[0]
    main_call = [line for line in started.read_text().splitlines() if "main.py" in line]
    assert len(main_call) == 1 and "--workers=0" in main_call[0]  # main.py's own flags still pass through
    assert not any(arg.split("=")[0] in main_call[0] for arg in harness), main_call[0]


# Item 2: a flag typo prints 46 lines; abbreviations -----------------------------------------------------

def test_main_flag_typo_is_one_line_with_the_closest_flag(tmp_path):
    proc = run_main(["--data-path", str(tmp_path), "--batchsize", "16"], env=clean_env(), inherit_env=False,
                    timeout=300)
    assert proc.returncode == 2
    assert_one_line_error(proc, "unknown flag --batchsize: did you mean --batch-size?")
    assert "usage:" not in proc.stderr


@pytest.mark.parametrize("argv, fragment", [
    (["--epoch", "1"], "unknown flag --epoch: did you mean --epochs?"),  # no silent abbreviation of --epochs
    (["--lr-warmup", "2"], "unknown flag --lr-warmup"),                   # was ambiguous: 3 flags start so
    (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
    (["--data-path=/d", "stray"], "unexpected argument 'stray'"),
])
def test_main_parser_errors_are_one_line_and_abbreviations_are_errors(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_lib.get_args_parser().parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err


def test_main_help_still_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_lib.get_args_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--batch-size" in capsys.readouterr().out


# Item 20 (part): arguments that let a run waste itself ----------------------------------------------------

@pytest.mark.parametrize("name", sorted(densenet.MODELS))
def test_smallest_image_the_model_accepts_is_what_the_check_says(name, torch_one_thread, data, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "RANK_ID", "RANK_SIZE"):
        monkeypatch.delenv(var, raising=False)
    args = main_lib.get_args_parser().parse_args(["--data-path", data, "--val-crop-size", "8"])
    with pytest.raises(cli.UserError) as refused:
        config.validate_args(args)
    smallest = int(re.search(r"the smallest it accepts is (\d+)", str(refused.value)).group(1))
    model = densenet.MODELS[name](num_classes=3)
    model.train()  # a training step at batch 2 (the least BatchNorm trains on), then evaluation at batch 1
    model(torch.randn(2, 3, smallest, smallest)).sum().backward()
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, smallest, smallest)).shape == (1, 3)
        with pytest.raises(RuntimeError, match="too small"):
            model(torch.randn(1, 3, smallest - 1, smallest - 1))


@pytest.mark.parametrize("argv, env, fragment", [
    (["--train-crop-size", "1"], {}, "--train-crop-size 1 is too small for DenseNet: the smallest it accepts is 29"),
    (["--val-crop-size", "8"], {}, "--val-crop-size 8 is too small for DenseNet: the smallest it accepts is 29"),
    (["--batch-size", "1"], {}, "--batch-size 1 is too small to train: BatchNorm needs at least 2 images per step"),
    (["--batch-size", "3"], {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
     "--batch-size 3 is the global batch: 1 image(s) per step on each of 2 ranks"),
    (["--output-dir", ""], {}, "--output-dir is empty"),
    (["--start-epoch", "3", "--epochs", "2"], {}, "nothing to train: --start-epoch 3 is not below --epochs 2"),
    (["--start-epoch", "2", "--epochs", "2"], {}, "nothing to train"),
], ids=["train-crop", "val-crop", "batch-1", "batch-per-rank", "output-dir-empty", "start-after-end", "start-at-end"])
def test_arguments_that_waste_a_run_are_refused_by_validation(data, tmp_path, monkeypatch, argv, env, fragment):
    # The old code trained and then crashed in the model (crops), skipped every step and saved an untrained
    # checkpoint (batch 1), saved nothing with exit 0 (--output-dir ""), or printed "epochs 3..1" with exit 0.
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "RANK_ID", "RANK_SIZE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    out = tmp_path / "out"
    args = main_lib.get_args_parser().parse_args(["--data-path", data, "--output-dir", str(out), *argv])
    with pytest.raises(cli.UserError) as refused:
        config.validate_args(args, launch.job_of(args).world_size)  # the first check: before any file is touched
    assert fragment in str(refused.value)
    assert not out.exists()


# Item 10: a mismatched torch/torchvision pair ------------------------------------------------------------

@pytest.fixture
def broken_torchvision(tmp_path):
    """A torchvision that fails as one built for another torch does."""
    package = tmp_path / "fake" / "torchvision"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    return str(tmp_path / "fake")


def mismatch_message():
    return f"error: torchvision {metadata.version('torchvision')} does not work with torch {torch.__version__}"


@pytest.mark.parametrize("tool", ["main.py", "predict.py"])
def test_torchvision_mismatch_is_one_line_naming_both_versions(broken_torchvision, tmp_path, tool):
    proc = subprocess.run([sys.executable, os.path.join(REPO, tool), "--help"], cwd=REPO, capture_output=True,
                          text=True, env=clean_env(PYTHONPATH=broken_torchvision), timeout=300)
    assert proc.returncode == 2
    assert_one_line_error(proc, mismatch_message())
    assert "operator torchvision::nms does not exist" in proc.stderr


@pytest.mark.parametrize("script, extra_env", [("train_full_1p.sh", {}), ("train_full_8p.sh", {"RANK_SIZE": 2})])
def test_launcher_with_torchvision_mismatch_names_no_missing_log(data, broken_torchvision, tmp_path, script,
                                                                 extra_env):
    # The old launcher printed the 27-line traceback and then "see .../train_0.log", a file never created.
    env = clean_env(PYTHONPATH=broken_torchvision, OUTPUT_ROOT=tmp_path / "output", MASTER_PORT=free_port(),
                    **extra_env)
    proc = run_script(script, [f"--data_path={data}", *TINY], env=env, timeout=300)
    assert proc.returncode == 2
    assert_one_line_error(proc, mismatch_message())
    named_logs_exist(proc.stdout + proc.stderr)


# Item 18-11 (launcher part): a rendezvous port in use --------------------------------------------------------

def test_8p_launcher_with_the_port_in_use_is_one_line_before_torchrun(data, tmp_path):
    # The old launcher ended in torchrun's DistNetworkError traceback (EADDRINUSE) after ~10 s.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        start = time.monotonic()
        proc = run_script("train_full_8p.sh", [f"--data_path={data}", *TINY],
                          env=clean_env(RANK_SIZE=2, MASTER_PORT=port, OUTPUT_ROOT=tmp_path / "output"), timeout=300)
    assert proc.returncode == 2
    assert_one_line_error(proc, f"MASTER_PORT {port} is in use on this machine")
    assert "set MASTER_PORT to a free port" in proc.stderr
    assert not (tmp_path / "output" / "0" / "train_0.log").exists()  # no rank started
    print(f"refused in {time.monotonic() - start:.1f} s")


# Items 7, 6 and 12: a preempted launcher run says how to resume; the resumed run's summary is never blank -----

def test_1p_launcher_stopped_by_ctrl_c_says_how_to_resume_and_the_command_works(data, tmp_path):
    # Item 7: the old launcher reported exit 75 as "error: training exited with status 75".
    python, calls = logged_python(tmp_path)
    root = tmp_path / "output"
    env = clean_env(PYTHON=python, OUTPUT_ROOT=root)
    # 3 steps an epoch, fewer than --warmup-steps 5: no steady-state FPS in any epoch (item 6).
    args = [f"--data_path={data}", "--epochs=3", *TINY, "--warmup-steps", "5"]
    code, out, err = start_and_interrupt(tmp_path, "train_full_1p.sh", args, env, seen="Epoch: [0]")
    assert code == 75, out + err
    assert "Traceback" not in err
    assert "error:" not in err, err  # a preemption is not an error
    line = err.strip().splitlines()[-1]
    assert line.startswith("stopped by a signal; to continue from the last checkpoint: "), err
    assert (root / "0" / "checkpoint.pth").is_file()
    command = line.split(": ", 1)[1]
    assert command.endswith("--resume auto") and f"OUTPUT_ROOT={root}" in command, command

    resumed = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert_ok(resumed)
    assert "continuing at epoch" in resumed.stdout, resumed.stdout  # it continued, it did not start again
    with open(root / "0" / "metrics.jsonl") as f:
        epochs = sorted({json.loads(line)["epoch"] for line in f})
    assert epochs == [0, 1, 2]

    # Item 6: never blank, and said to include warm-up.
    final = dict(re.findall(r"^(Final Performance images/sec|Final Train Accuracy) : (.*)$", resumed.stdout, re.M))
    assert float(final["Final Performance images/sec"]) > 0, resumed.stdout
    assert "whole epoch, warm-up included" in resumed.stdout
    summary = next(root.glob("0/*_1p_acc.log")).read_text()
    fields = dict(line.split(" = ", 1) for line in summary.splitlines())
    assert float(fields["ActualFPS"]) > 0 and float(fields["TrainingTime"]) > 0, summary
    assert fields["FPSWindow"] == "whole epoch, warm-up included"

    # Item 12: the curves carry plot_metrics.py's own title, the one the README shows.
    plot_calls = [c for c in calls.read_text().splitlines() if "plot_metrics.py" in c]
    assert len(plot_calls) == 1 and "--title" not in plot_calls[0], plot_calls
    assert any(root.glob("0/*_curves.png"))


def test_8p_launcher_stopped_by_ctrl_c_is_one_line_not_torchruns_traceback(data, tmp_path):
    # The old launcher ended in torchrun's SignalException traceback and exit 1 (the ranks had saved).
    root = tmp_path / "output"
    env = clean_env(RANK_SIZE=2, MASTER_PORT=free_port(), OUTPUT_ROOT=root)
    args = [f"--data_path={data}", "--epochs=3", *TINY]
    code, out, err = start_and_interrupt(tmp_path, "train_full_8p.sh", args, env, seen="Epoch: [0]")
    assert code == 75, out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and "SignalException" not in err, err
    assert not any("torch/distributed" in line for line in lines), err  # no "Sending process ... SIGINT" either
    assert lines[-1].startswith("stopped by a signal; to continue from the last checkpoint: "), err
    assert "RANK_SIZE=2" in lines[-1] and lines[-1].endswith("--resume auto"), lines[-1]
    assert (root / "0" / "checkpoint.pth").is_file()


# Item 6 on hand-made records: the summary's FPS is never blank -------------------------------------------

def write_run(folder, records):
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"network": "DenseNet201_for_PyTorch", "batch_size": 64,
                                                 "world_size": 1, "device": "cpu"}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(folder)


def test_summary_of_an_epoch_without_steady_state_reports_the_whole_epoch(tmp_path, capsys):
    record = {"epoch": 0, "fps": None, "epoch_fps": 12.5, "val_acc1": 50.0, "last_loss": 1.0}
    folder = write_run(tmp_path / "short", [record])
    assert run_summary.main(run_summary.get_args_parser().parse_args([folder, "--e2e-seconds", "9"])) == 0
    out = capsys.readouterr().out
    assert "Final Performance images/sec : 12.50\n" in out
    assert "whole epoch, warm-up included" in out
    fields = dict(line.split(" = ", 1) for line in open(os.path.join(folder, "DenseNet201_for_PyTorch_bs64_1p_acc.log"))
                  .read().splitlines())
    assert fields["ActualFPS"] == "12.50" and fields["TrainingTime"] == "5120.00"  # 64 images x 1000 / 12.5
    assert fields["FPSWindow"] == "whole epoch, warm-up included"


def test_summary_with_a_steady_state_reports_it(tmp_path, capsys):
    record = {"epoch": 0, "fps": 20.0, "epoch_fps": 12.5, "val_acc1": 50.0, "last_loss": 1.0}
    folder = write_run(tmp_path / "long", [record])
    assert run_summary.main(run_summary.get_args_parser().parse_args([folder])) == 0
    out = capsys.readouterr().out
    assert "Final Performance images/sec : 20.00\n" in out and "warm-up" not in out
    fields = dict(line.split(" = ", 1) for line in open(os.path.join(folder, "DenseNet201_for_PyTorch_bs64_1p_acc.log"))
                  .read().splitlines())
    assert fields["ActualFPS"] == "20.00" and fields["FPSWindow"] == "steady state"


# Items 11 and 12: the README's first commands ------------------------------------------------------------

def readme_section(title):
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_quick_start_gives_the_cpu_wheel_command_and_a_check_that_runs():
    quick = readme_section("Quick start")
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in quick
    check = re.search(r'python -c "import torch, torchvision; [^"]+"', quick)
    assert check, quick
    proc = subprocess.run(check.group(0), shell=True, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=clean_env(PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"))
    assert_ok(proc)
    import torchvision
    assert torch.__version__ in proc.stdout and torchvision.__version__ in proc.stdout, proc.stdout


def test_readme_shows_the_curves_title_the_launcher_writes_and_venv_is_ignored(tmp_path):
    # The demo's run.json and 10 epochs give plot_metrics.py's title (the launcher no longer overrides it).
    import plot_metrics
    folder = write_run(tmp_path / "demo", [{"epoch": e} for e in range(10)])
    title = f"{plot_metrics.run_name(os.path.join(folder, 'metrics.jsonl'))}: 10 epochs (0-9)"
    assert title == "DenseNet201_for_PyTorch_bs64_1p: 10 epochs (0-9)"
    with open(os.path.join(REPO, "README.md")) as f:
        assert f"`{title}`" in f.read()
    assert "test/demo.sh" in readme_section("Quick start")  # where the demo's small-image flags come from
    ignored = subprocess.run(["git", "check-ignore", "-q", ".venv/bin/python"], cwd=REPO)
    assert ignored.returncode == 0, ".venv/ is not in .gitignore"
