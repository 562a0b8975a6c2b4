"""Input-pipeline faults at start-up and in the fast decoder: a JPEG only PIL decodes (issue 18 item 8), a small
/dev/shm (issue 20 item 19), a batch larger than the training set (issue 20 item 9)."""
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, SMALL_RUN, assert_ok, assert_one_line_error, run_main, write_image_folder

import data
import layout
import decode

ENV = {"OMP_NUM_THREADS": "1"}
TINY = ["--model", "densenet121", *SMALL_RUN, "--batch-size", "8", "--lr", "0.01"]


# Issue 18 item 8: libjpeg-turbo (through torchvision) refuses, PIL decodes --------------------------------------

def stray_marker_jpeg(path):
    """A real JPEG with a stray COM marker (0xFFFE) in the middle of its compressed data, as a bit error or a
    bad writer leaves one: torchvision's decoder calls it "incomplete or truncated", PIL's libjpeg warns
    ("Corrupt JPEG data: premature end of data segment") and decodes the picture."""
    rng = np.random.default_rng(0)
    pixels = np.clip(np.array([200, 40, 40]) + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    middle = (jpeg.find(b"\xff\xda") + len(jpeg)) // 2
    with open(path, "wb") as f:
        f.write(jpeg[:middle] + b"\xff\xfe" + jpeg[middle:])
    return str(path)


def test_jpeg_that_only_pil_decodes_is_readable(tmp_path):
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    path = stray_marker_jpeg(folder / "stray_marker.JPEG")
    # The file is what the test needs: torchvision's libjpeg-turbo path refuses it, PIL reads it.
    with open(path, "rb") as f:
        encoded = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    with pytest.raises(RuntimeError):
        decode._decode_jpeg(encoded, mode=decode._ImageReadMode.RGB)
    pil = decode.load_rgb(path)
    assert pil.size == (48, 40)

    train = data.train_dataset(str(tmp_path / "train"), 32, fast_decode=True, seed=3)
    assert train.loader is decode.load_encoded  # the fast path is the one under test
    sample = train[(2, 0, 0)]
    assert not isinstance(sample, data.BadSample), sample.reason
    image, target = sample
    # The same crop the fast path draws for this key (same seed, so the same box), taken from PIL's pixels.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(train._sample_seed(2, 0, 0))
        expected = decode.FastRandomResizedCrop(32)(pil)
    assert target == 0 and torch.equal(image, expected)


def test_jpeg_neither_decoder_reads_is_still_unreadable(tmp_path):
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    good = stray_marker_jpeg(folder / "x.JPEG")
    with open(good, "rb") as f:
        jpeg = f.read()
    sos = jpeg.find(b"\xff\xda")
    with open(folder / "x.JPEG", "wb") as f:  # an unknown marker type inside the scan: both refuse it
        f.write(jpeg[:sos + 40] + b"\xff\x80" + jpeg[sos + 40:])
    sample = data.train_dataset(str(tmp_path / "train"), 32, fast_decode=True)[(0, 0, 0)]
    assert isinstance(sample, data.BadSample) and sample.path.endswith("x.JPEG")


# Issue 20 item 19: a small /dev/shm ----------------------------------------------------------------------------

def can_mount_tmpfs():
    return os.geteuid() == 0 and shutil.which("unshare") and subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True).returncode == 0


needs_mount = pytest.mark.skipif(not can_mount_tmpfs(), reason="needs root and mount namespaces (unshare -m)")


@needs_mount
def test_small_dev_shm_is_one_line_at_start(tmp_path):
    # Docker's small /dev/shm, made real: a 64 KiB tmpfs over /dev/shm in a private mount namespace (the rest
    # of the machine keeps its own). The old code failed in a worker with a traceback and then hung at exit.
    root = write_image_folder(tmp_path / "data")
    command = [sys.executable, os.path.join(REPO, "main.py"), "--data-path", root, "--output-dir",
               str(tmp_path / "out"), *TINY, "--workers", "2", "--batch-size", "4", "--epochs", "1"]
    script = 'mount -t tmpfs -o size=64k tmpfs /dev/shm && exec "$@"'
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *command], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **ENV}, timeout=120)
    assert_one_line_error(proc, "/dev/shm has 64.0 KiB free but the data loaders need about 120.0 KiB")
    assert "--shm-size" in proc.stderr and "--workers 0 fits" in proc.stderr
    assert proc.returncode == 2 and "Epoch" not in proc.stdout


@needs_mount
def test_shared_memory_check_against_a_real_tmpfs(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(shm)], check=True)
    try:
        data.check_shared_memory(2, 4, 32, folder=str(shm))  # (2 x 4 + 2) x 4 x 3 x 32 x 32 = 120 KiB: fits
        # (3 x 4 + 2) x 96 KiB = 1.3 MiB does not; 1 MiB holds 10 such batches: the trainer's 2 and 4 per worker.
        with pytest.raises(layout.DataError, match=r"1\.0 MiB free but the data loaders need about 1\.3 MiB .*"
                                                 r"--workers 2 fits"):
            data.check_shared_memory(3, 32, 32, folder=str(shm))
        with pytest.raises(layout.DataError, match=r"\(2 workers x 4 \+ 2\) batches x 16 images x 3x64x64 .*"
                                                 r"--workers 0 fits"):
            data.check_shared_memory(2, 16, 64, folder=str(shm))
        # What others already hold counts: fill most of it, and what fitted no longer does.
        with open(shm / "other", "wb") as f:
            f.write(bytes(1000 * 1024))
        with pytest.raises(layout.DataError, match="--workers 0 fits"):
            data.check_shared_memory(2, 4, 32, folder=str(shm))
    finally:
        subprocess.run(["umount", str(shm)], check=True)
    assert data.shared_memory_need(0, 256, 224) == 0  # no workers: batches never leave the process
    data.check_shared_memory(0, 256, 224, folder=str(shm))


# Issue 20 item 9: a batch larger than the training set ---------------------------------------------------------

def test_batch_larger_than_training_set_warns_once(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=2, train_per_class=5, val_per_class=1)
    proc = run_main(["--data-path", root, "--output-dir", str(tmp_path / "out"), *SMALL_RUN,
                     "--model", "densenet121", "--batch-size", "16", "--epochs", "2"], env=ENV)
    assert_ok(proc)
    warnings = [line for line in proc.stderr.splitlines() if "larger than the training set" in line]
    assert warnings == ["WARNING: --batch-size 16 is larger than the training set (10 images): every epoch is a "
                        "single step of 10 images; lower --batch-size (and --lr with it) to train more than one "
                        "step per epoch"], proc.stderr
