"""Checkpoints written before the redesign of main.py/utils.py (commit dfa5967, the last release with
main.checkpoint_state) still resume: the old code is taken from git history, trains one epoch, and today's
main.py continues from its checkpoint."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SMALL_RUN, assert_ok, run_main, write_image_folder

OLD_RELEASE = "dfa5967"


def old_tree(dest):
    """The repository as it was at OLD_RELEASE, or None when this clone lacks that history (a shallow clone)."""
    if subprocess.run(["git", "-C", REPO, "cat-file", "-e", f"{OLD_RELEASE}^{{commit}}"],
                      capture_output=True).returncode != 0:
        return None
    archive = subprocess.run(["git", "-C", REPO, "archive", OLD_RELEASE], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def test_checkpoint_of_the_previous_release_resumes(tmp_path):
    (tmp_path / "old").mkdir()
    old = old_tree(tmp_path / "old")
    if old is None:
        pytest.skip(f"this clone has no commit {OLD_RELEASE} (shallow clone): cannot build an old checkpoint")
    data = write_image_folder(tmp_path / "data", classes=3, train_per_class=8, val_per_class=2, size=32)
    out = tmp_path / "out"
    flags = [*SMALL_RUN, "--model", "densenet121", "--data-path", data, "--output-dir", str(out), "-b", "8",
             "--momentum", "0.9", "--lr", "0.05"]
    proc = subprocess.run([sys.executable, str(old / "main.py"), *flags, "--epochs", "1"], cwd=str(old),
                          capture_output=True, text=True, timeout=600)
    assert_ok(proc)
    saved = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert saved["next_epoch"] == 1 and "lr_scheduler" in saved  # the old layout, as the old code wrote it

    proc = run_main([*flags, "--epochs", "2", "--resume", str(out / "checkpoint.pth")])
    assert_ok(proc)
    assert "Resumed from" in proc.stdout and "continuing at epoch 1, step 0" in proc.stdout, proc.stdout
    assert "Epoch: [1]" in proc.stdout and "Epoch: [0]" not in proc.stdout
    resumed = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert resumed["next_epoch"] == 2
    # The momentum buffers came back: the old optimizer state was loaded, not restarted from zero.
    assert len(resumed["optimizer"]["state"]) == len(saved["optimizer"]["state"]) > 0
    assert not os.path.exists(out / "model_2.pth")
