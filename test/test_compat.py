"""Checkpoints written by earlier layouts still resume: commit dfa5967 (the last release with
main.checkpoint_state) and 4cf9c23 (the last before the stop protocol and the one 'position' record). The old
code is taken from git history, trains one epoch, and today's main.py continues from its checkpoint."""
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SMALL_RUN, Proc, assert_ok, clean_env, metrics, run_main, write_image_folder

def old_tree(release, dest):
    """The repository as it was at `release`, or None when this clone lacks that history (a shallow clone)."""
    if subprocess.run(["git", "-C", REPO, "cat-file", "-e", f"{release}^{{commit}}"],
                      capture_output=True).returncode != 0:
        return None
    archive = subprocess.run(["git", "-C", REPO, "archive", release], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


@pytest.mark.parametrize("release", ["dfa5967"])  # (4cf9c23's layout: the mid-epoch test below)
def test_checkpoint_of_an_earlier_layout_resumes(tmp_path, release):
    (tmp_path / "old").mkdir()
    old = old_tree(release, tmp_path / "old")
    if old is None:
        pytest.skip(f"this clone has no commit {release} (shallow clone): cannot build an old checkpoint")
    data = write_image_folder(tmp_path / "data", classes=3, train_per_class=8, val_per_class=2, size=32)
    out = tmp_path / "out"
    flags = [*SMALL_RUN, "--model", "densenet121", "--data-path", data, "--output-dir", str(out), "-b", "8",
             "--momentum", "0.9", "--lr", "0.05"]
    proc = subprocess.run([sys.executable, str(old / "main.py"), *flags, "--epochs", "1"], cwd=str(old),
                          capture_output=True, text=True, timeout=600)
    assert_ok(proc)
    saved = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert saved["next_epoch"] == 1 and "position" not in saved  # the old layout, as the old code wrote it

    proc = run_main([*flags, "--epochs", "2", "--resume", str(out / "checkpoint.pth")])
    assert_ok(proc)
    assert "Resumed from" in proc.stdout and "continuing at epoch 1, step 0" in proc.stdout, proc.stdout
    assert "Epoch: [1]" in proc.stdout and "Epoch: [0]" not in proc.stdout
    resumed = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert resumed["position"]["epoch"] == 2 and "next_epoch" not in resumed
    # The momentum buffers came back: the old optimizer state was loaded, not restarted from zero.
    assert len(resumed["optimizer"]["state"]) == len(saved["optimizer"]["state"]) > 0
    assert not os.path.exists(out / "model_2.pth")


def test_a_mid_epoch_checkpoint_of_the_previous_layout_resumes_at_its_step(tmp_path):
    (tmp_path / "old").mkdir()
    old = old_tree("4cf9c23", tmp_path / "old")
    if old is None:
        pytest.skip("this clone has no commit 4cf9c23 (shallow clone): cannot build an old checkpoint")
    data = write_image_folder(tmp_path / "data", classes=3, train_per_class=16, val_per_class=2, size=32)
    out = tmp_path / "out"
    flags = [*SMALL_RUN, "--model", "densenet121", "--data-path", data, "--output-dir", str(out), "-b", "4"]
    proc = Proc([*flags, "--epochs", "1"], clean_env(), script=str(old / "main.py"))
    proc.wait_for(r"^Epoch: \[0\]\s+\[\s*2/12\]")
    proc.p.send_signal(signal.SIGTERM)
    assert proc.finish(timeout=120) == 75, proc.stdout + proc.stderr
    saved = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    step = saved["next_step"]
    assert saved["next_epoch"] == 0 and 2 <= step < 12 and "position" not in saved

    proc = run_main([*flags, "--epochs", "1", "--resume", "auto"], env=clean_env(), inherit_env=False)
    assert f"continuing at epoch 0, step {step}" in assert_ok(proc), proc.stdout
    assert metrics(out)[-1]["images"] == 48  # the old attempt's sums were carried over
