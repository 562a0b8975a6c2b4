"""Performance mode and the fast paths, functionally (no timings are asserted here; see benchmark.py).

  * --max-steps / --synthetic, and the perf launcher's summary (CaseName *_perf, numeric ActualFPS)
  * the fast training decode (--fast-decode, the default) against torchvision's PIL path
  * --compile and --memory-efficient give the default's loss; the step makes no host syncs between prints
"""
import io
import os
import re
import shutil
import sys
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import REPO, SMALL_RUN, assert_ok, run_main, run_script, write_image_folder  # noqa: E402

sys.path.insert(0, REPO)
import data  # noqa: E402
import decode  # noqa: E402
import densenet  # noqa: E402
import config  # noqa: E402
import launch  # noqa: E402
import engine  # noqa: E402
import stop as stop_lib  # noqa: E402
import main  # noqa: E402
import trainer as trainer_lib  # noqa: E402
from device import build_mixed_precision, resolve_device  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # in-process steps on tiny inputs: one thread

ENV = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
TINY = ["--model", "densenet121", *SMALL_RUN, "--batch-size", "4"]
NUM = r"(\d+(?:\.\d+)?)"

# Fast decode vs torchvision's PIL path, same file, same crop box, same flip. The JPEG decode is the same
# libjpeg-turbo arithmetic (asserted exact below), so the only difference is the antialiased bilinear resize:
# torch's vectorised uint8 kernel and Pillow's compute the same separable filter in fixed point with
# different precisions, and each of the two passes may round the other way: at most 1 grey level per pass.
RESIZE_MAX_DIFF = 2
RESIZE_MEAN_DIFF = 0.1


def step_numbers(log):
    return [int(s) for s in re.findall(r"^Epoch: \[0\]\s+\[\s*(\d+)/\d+\]", log, re.M)]


def photo(width, height, seed):
    """A smooth, photo-like RGB image (low-frequency colour fields, an edge, mild noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        (fx, fy), phase = rng.uniform(0.5, 4, 2) * 2 * np.pi / np.array([width, height]), rng.uniform(0, 6.3)
        channels.append(128 + 80 * np.sin(fx * x + fy * y + phase) + 30 * (x > width * rng.uniform(0.3, 0.7)))
    pixels = np.stack(channels, -1) + rng.normal(0, 4, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_photos(root, sizes, fmt="JPEG", mode="RGB", seed=0):
    os.makedirs(root, exist_ok=True)
    for k, (w, h) in enumerate(sizes):
        img = photo(w, h, seed + k).convert(mode)
        ext = "png" if fmt == "PNG" else "jpg"
        img.save(os.path.join(root, f"img_{k:03d}.{ext}"), format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return root


# ----------------------------------------------------------------------------
# 1. --max-steps, --synthetic, the perf launcher
# ----------------------------------------------------------------------------

def test_max_steps_stops_where_asked_on_real_data(tmp_path):
    root = write_image_folder(tmp_path / "data")  # 24 training images = 6 batches of 4
    proc = run_main(["--data-path", root, "--output-dir", str(tmp_path / "out"), *TINY, "--epochs", "1",
                     "--max-steps", "3"], env=ENV)
    assert_ok(proc)
    assert step_numbers(proc.stdout) == [1, 2, 3], proc.stdout
    assert re.search(r"^Train \[0\] done in .*images 12 ", proc.stdout, re.M), proc.stdout


def test_synthetic_needs_no_data_path(tmp_path):
    proc = run_main(["--synthetic", "--output-dir", str(tmp_path), *TINY, "--epochs", "1", "--max-steps", "5",
                     "--warmup-steps", "2", "--num_classes", "10"], env=ENV)
    assert_ok(proc)
    assert step_numbers(proc.stdout) == [1, 2, 3, 4, 5], proc.stdout
    assert re.search(rf"^Train \[0\] FPS: {NUM} img/s \(steady state: steps 3-5 of 5, 12 images .*excluded "
                     r"\(synthetic\)", proc.stdout, re.M), proc.stdout
    assert " * Acc@1" not in proc.stdout  # nothing to evaluate


def test_perf_launcher_synthetic_summary(tmp_path):
    env = {**ENV, "OUTPUT_ROOT": str(tmp_path / "output"), "ASCEND_DEVICE_ID": "0"}
    proc = run_script("train_performance_1p.sh", ["--synthetic", "--model", "densenet121", "--batch-size", "4",
                                                  "--max-steps", "8", "--device", "cpu", "--train-crop-size", "32",
                                                  "--warmup-steps", "2"], env=env, timeout=300)
    assert_ok(proc)
    summaries = [n for n in os.listdir(tmp_path / "output" / "0") if n.endswith("_perf.log")]
    # Network follows --model
    assert summaries == ["DenseNet121_for_PyTorch_bs4_1p_perf.log"], os.listdir(tmp_path / "output" / "0")
    fields = dict(line.split(" = ", 1) for line in
                  (tmp_path / "output" / "0" / summaries[0]).read_text().splitlines() if " = " in line)
    assert fields["CaseName"].endswith("_perf")
    assert float(fields["ActualFPS"]) > 0, fields
    assert float(fields["TrainingTime"]) > 0, fields
    log = (tmp_path / "output" / "0" / "train_0.log").read_text()
    assert step_numbers(log)[-1] == 8, log  # the launcher's --max-steps 100 gave way to ours
    assert re.search(r"FPS: .*steps 3-8 of 8, 24 images", log), log  # first --warmup-steps excluded


def test_perf_launcher_needs_data_path_or_synthetic(tmp_path):
    proc = run_script("train_performance_1p.sh", ["--device", "cpu"],
                      env={**ENV, "OUTPUT_ROOT": str(tmp_path / "output"), "ASCEND_DEVICE_ID": "0"}, timeout=60)
    assert proc.returncode == 2
    assert "--synthetic" in proc.stderr and "--data_path" in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------
# 2. Fast training decode vs torchvision's PIL path
# ----------------------------------------------------------------------------

def test_fast_decode_is_the_default_and_falls_back_where_it_must(tmp_path):
    args = main.get_args_parser().parse_args(["--synthetic"])
    assert args.fast_decode is True
    write_photos(tmp_path / "data" / "c0", [(40, 30)])
    root = str(tmp_path / "data")

    def reader(**kwargs):
        return data.train_dataset(root, 32, **kwargs).loader

    assert reader(fast_decode=True) is decode.load_encoded
    assert reader() is decode.load_rgb  # the library default stays torchvision's PIL path
    # PIL-level augmentations and other filters keep the PIL path (exactly torchvision's) even when asked.
    assert reader(auto_augment="ta_wide", fast_decode=True) is decode.load_rgb
    assert reader(interpolation="bicubic", fast_decode=True) is decode.load_rgb
    erase = data.train_dataset(root, 32, random_erase=0.5, fast_decode=True)
    assert erase.loader is decode.load_encoded and len(erase.transform.transforms) == 2
    assert isinstance(erase.transform.transforms[0], decode.FastRandomResizedCrop)


def test_jpeg_header_parser_agrees_with_pil(tmp_path):
    src = photo(70, 50, 1)
    for mode, kwargs in (("RGB", {}), ("RGB", {"progressive": True}), ("L", {}), ("CMYK", {}),
                         ("RGB", {"exif": b"Exif\0\0" + b"x" * 300})):
        buf = io.BytesIO()
        src.convert(mode).save(buf, "JPEG", **kwargs)
        with Image.open(io.BytesIO(buf.getvalue())) as img:
            assert decode.jpeg_header(bytearray(buf.getvalue())) == (img.mode, img.size)
    assert decode.jpeg_header(bytearray(b"\x89PNG\r\n")) is None and decode.jpeg_header(bytearray()) is None


def test_fast_decode_pixels_are_libjpegs_exactly(tmp_path):
    from torchvision.io import ImageReadMode, decode_jpeg
    path = write_photos(tmp_path / "p", [(97, 61)])
    file = os.path.join(path, os.listdir(path)[0])
    with open(file, "rb") as f:
        decoded = decode_jpeg(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), mode=ImageReadMode.RGB)
    pil = torch.from_numpy(np.array(data.load_rgb(file))).permute(2, 0, 1)
    assert torch.equal(decoded, pil)


def pair(tmp_path, sizes, crop, fmt="JPEG", mode="RGB", **transform_kwargs):
    """The standard (PIL) and fast datasets over the same files, with the same seed."""
    write_photos(tmp_path / "data" / "c0", sizes, fmt=fmt, mode=mode)
    root = str(tmp_path / "data")
    standard = data.ImageFolderDataset(root, data.train_transform(crop, **transform_kwargs), seed=5)
    fast = data.train_dataset(root, crop, fast_decode=True, seed=5, **transform_kwargs)
    assert standard.loader is decode.load_rgb and fast.loader is decode.load_encoded
    return standard, fast


def diffs(standard, fast, keys):
    worst, means = 0, []
    for key in keys:
        (a, ta), (b, tb) = standard[key], fast[key]
        assert ta == tb and a.dtype == b.dtype == torch.uint8 and a.shape == b.shape, (a.shape, b.shape)
        d = (a.int() - b.int()).abs()
        worst, means = max(worst, int(d.max())), means + [float(d.float().mean())]
    return worst, sum(means) / len(means)


@pytest.mark.parametrize("fmt, mode", [("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("JPEG", "CMYK")],
                         ids=["jpeg", "grey-jpeg", "png", "cmyk-jpeg"])
def test_fast_decode_matches_standard_for_the_same_crops(tmp_path, fmt, mode):
    # Crops drawn from the header's size with the same RNG draws: same boxes, same flips, pixels within rounding.
    sizes = [(120, 90), (90, 120), (101, 77), (64, 64)]
    standard, fast = pair(tmp_path, sizes, 56, fmt=fmt, mode=mode)
    worst, mean = diffs(standard, fast, [(epoch, i, 0) for epoch in range(3) for i in range(len(sizes))])
    assert worst <= RESIZE_MAX_DIFF and mean <= RESIZE_MEAN_DIFF, (worst, mean)


def test_fast_decode_flip_and_crop_follow_the_seed(tmp_path):
    # Full-image crops, no resize (crop == size): the only possible difference is the flip, which must agree.
    standard, fast = pair(tmp_path, [(48, 48)] * 3, 48, scale=(1.0, 1.0))
    for key in [(e, i, 0) for e in range(6) for i in range(3)]:
        assert torch.equal(standard[key][0], fast[key][0]), key


def test_reduced_size_decode_keeps_the_content(tmp_path):
    # A 512x384 photo cropped to 32 px: libjpeg decodes at 1/2..1/8 scale. Not the same bits (the DCT-domain
    # downscale replaces part of the antialiasing filter), but the same picture: ~0.75 grey levels apart on
    # average (a few levels at sharp edges), against 60-80 between two different crops of the same photo.
    standard, fast = pair(tmp_path, [(512, 384)] * 2, 32)
    header = decode.load_encoded(standard.samples[0][0])
    assert fast.transform.transforms[0].reduction(384, 512, header) == 8
    worst, mean = diffs(standard, fast, [(e, i, 0) for e in range(4) for i in range(2)])
    assert mean < 2, (worst, mean)
    no_reduce = decode.FastRandomResizedCrop(32, reduced_decode=False)
    assert no_reduce.reduction(384, 512, header) == 1


def test_fast_decode_reports_truncated_and_non_images(tmp_path):
    folder = write_photos(tmp_path / "data" / "c0", [(80, 60), (80, 60)])
    good = os.path.join(folder, "img_000.jpg")
    with open(good, "rb") as f:
        blob = f.read()
    with open(os.path.join(folder, "img_001.jpg"), "wb") as f:
        f.write(blob[: len(blob) // 2])  # truncated: the header parses, the pixels don't
    with open(os.path.join(folder, "img_002.jpg"), "wb") as f:
        f.write(b"not an image at all")
    ds = data.train_dataset(str(tmp_path / "data"), 32, fast_decode=True)
    results = {os.path.basename(ds.samples[i][0]): ds[i] for i in range(len(ds))}
    assert results["img_000.jpg"][0].shape == (3, 32, 32)
    for name in ("img_001.jpg", "img_002.jpg"):
        assert isinstance(results[name], data.BadSample), name
        assert results[name].path.endswith(name) and results[name].reason
    batch = data.collate_skip_bad(list(results.values()))
    assert batch.images.shape == (1, 3, 32, 32) and len(batch.bad) == 2


def test_model_trains_on_the_fast_pipeline(tmp_path):
    # Through the real DataLoader (a worker process, uint8 batches, normalisation on the device).
    root = write_image_folder(tmp_path / "data", classes=3, train_per_class=8, size=48)
    train = data.train_dataset(os.path.join(root, "train"), 32, fast_decode=True, seed=1)
    assert train.loader is decode.load_encoded
    sampler = data.ResumableDistributedSampler(len(train), seed=1)
    loader = data.make_loader(train, sampler, 8, 1, False, 1, drop_last=True)
    torch.manual_seed(0)
    model = densenet.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3)
    model.to(memory_format=torch.channels_last)
    normalize = data.DeviceNormalize(torch.device("cpu"), channels_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for epoch in range(8):
        sampler.set_epoch(epoch)
        for batch in loader:
            assert batch.images.dtype == torch.uint8 and batch.images.shape == (8, 3, 32, 32) and not batch.bad
            loss = nn.functional.cross_entropy(model(normalize(batch.images)), batch.targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


def test_main_trains_without_fast_decode(tmp_path):
    # The default (fast) path runs in every other real-data test; this is torchvision's PIL path, on request.
    root = write_image_folder(tmp_path / "data")
    proc = run_main(["--data-path", root, "--output-dir", str(tmp_path / "out"), *TINY, "--epochs", "1",
                     "--max-steps", "2", "--no-fast-decode"], env=ENV)
    assert_ok(proc)
    assert re.search(r"Train \[0\] done in .*train loss \d", proc.stdout), proc.stdout


# ----------------------------------------------------------------------------
# 3. The training step: --compile, --memory-efficient, no host syncs
# ----------------------------------------------------------------------------

def tiny_densenet(**kwargs):
    return densenet.DenseNet(growth_rate=4, block_config=(2,), num_init_features=8, bn_size=2, num_classes=5,
                             **kwargs)


def run_steps(model, argv, steps=3, batch_size=4, size=32):
    """engine.train_one_epoch on a fixed synthetic batch, through the trainer main.py builds (trainer.build_trainer:
    optimizer, mixed precision, channels_last, --compile) and its one training step, Trainer.step; only the
    architecture is the tiny `model` instead of --model's. Returns the epoch's stats and the model."""
    args = config.get_args_parser().parse_args(["--synthetic", "--device", "cpu", "--model", "densenet121",
                                                "--print-freq", "1", "--warmup-steps", "1", "--lr", "0.1", *argv])
    config.resolve_from_checkpoint(args)
    device = resolve_device("cpu")
    torch.manual_seed(0)
    amp = build_mixed_precision(args, device)
    with mock.patch.object(densenet, "build_model", lambda *a, **k: model):
        t = trainer_lib.build_trainer(args, device, 5, amp, channels_last=True)
    assert t.model_without_ddp is model and model.features.conv0.weight.is_contiguous(
        memory_format=torch.channels_last)
    loader = data.SyntheticLoader(batch_size, size, 5, steps, seed=3)
    stop = stop_lib.Stop()
    try:
        with stop.running():
            stats = engine.train_one_epoch(t, loader, 0, 0, len(loader), args, stop)
    finally:
        stop.restore()
    return stats, model


def test_memory_efficient_gives_the_same_loss_and_weights():
    torch.manual_seed(0)
    plain = tiny_densenet()
    efficient = tiny_densenet(memory_efficient=True)
    efficient.load_state_dict(plain.state_dict())
    a, plain = run_steps(plain, [])
    b, efficient = run_steps(efficient, ["--memory-efficient"])
    # Checkpointing recomputes the same ops on the same inputs: the same numbers, up to float reassociation.
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
    for (name, x), y in zip(plain.state_dict().items(), efficient.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=name)


def _have_compiler():
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _have_compiler(), reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
def test_compile_gives_the_same_loss(capsys):
    # A tiny DenseNet: compiling densenet121's graph would take minutes on a 2-core machine (this one builds ~18 C++
    # kernels with gcc: 30-90 s cold, a few seconds once inductor's cache in /tmp/torchinductor_$USER has them).
    torch.manual_seed(0)
    eager = densenet.DenseNet(growth_rate=4, block_config=(1,), num_init_features=8, bn_size=2, num_classes=5)
    compiled = densenet.DenseNet(growth_rate=4, block_config=(1,), num_init_features=8, bn_size=2, num_classes=5)
    compiled.load_state_dict(eager.state_dict())
    a, _ = run_steps(eager, [])
    capsys.readouterr()
    b, _ = run_steps(compiled, ["--compile", "--warmup-steps", "0"])
    log = capsys.readouterr().out
    # Fused kernels sum in another order: float32 rounding, nothing more.
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    assert re.search(r"first step took .* s \(torch\.compile compilation; excluded from FPS\)", log), log
    assert re.search(r"FPS: .*steps 2-3 of 3", log), log  # compilation stays out of the window, even at 0


def test_no_host_sync_between_print_steps(monkeypatch):
    """Outside print steps the step must not read device values on the host (.item(), float(), bool(),
    tolist()...) nor copy host values to the device with torch.tensor(..., device=): each is a full
    device sync on a GPU/NPU. Counted on the CPU, where the same calls happen."""
    calls, step = [], {"now": None}
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _original=original, **k):
            calls.append((step["now"], _name))
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    original_tensor = torch.tensor

    def tensor_spy(*a, **k):
        if k.get("device") is not None:
            calls.append((step["now"], "torch.tensor(device=)"))
        return original_tensor(*a, **k)
    monkeypatch.setattr(torch, "tensor", tensor_spy)

    # Calls are attributed to the step whose Trainer.step ran last (the loop fetches the next batch before it
    # trains the current one, so the loader's count runs one ahead).
    original_step = trainer_lib.Trainer.step

    def counting_step(self, *a, **k):
        step["now"] = 0 if step["now"] is None else step["now"] + 1
        return original_step(self, *a, **k)
    monkeypatch.setattr(trainer_lib.Trainer, "step", counting_step)
    torch.manual_seed(0)
    run_steps(tiny_densenet(), ["--print-freq", "100", "--warmup-steps", "1"], steps=6)
    # Step 0 opens the loop, step 5 is the (last) print step; steps 1-4 must be sync-free.
    assert [c for c in calls if c[0] in (1, 2, 3, 4)] == []
    assert [c for c in calls if c[0] == 5], "the spy saw nothing at the print step: it is not working"


def test_loader_settings(monkeypatch):
    ds = torch.utils.data.TensorDataset(torch.zeros(4))
    loader = data.make_loader(ds, None, 2, 2, True, 0)
    assert loader.persistent_workers and loader.prefetch_factor == 4 and loader.pin_memory
    assert loader.num_workers == 2 and loader.batch_size == 2 and loader.collate_fn is data.collate_skip_bad
    in_process = data.make_loader(ds, None, 2, 0, False, 0)
    assert in_process.prefetch_factor is None and not in_process.persistent_workers and not in_process.pin_memory
    # Default workers: the cores this process may use, shared among the ranks on the machine, never negative.
    def workers(ranks):
        return launch.default_workers(ranks)[0]
    assert workers(1) >= workers(2) >= 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert workers(1) == 31  # no cap at 8: a 32-core single-GPU box feeds the GPU with 31 decoders
    assert workers(1) > workers(2) > workers(8) > 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert workers(1) == 0 and workers(4) == 0  # one core: load in the trainer


def test_benchmark_times_the_trainers_step_and_the_stop_agreement():
    """benchmark.py's "ours" is what trains (config's parser, trainer.build_trainer, Trainer.step, engine.Meter)
    and its control section times stop.Stop's agreement: one step of each side and a few agreements, in this
    process (no timings asserted; one process, so the agreement sums are this rank's own)."""
    import bench_core
    import bench_dist
    import benchmark
    from stop import Stop
    device = resolve_device("cpu")
    args = benchmark.apply_device_defaults(benchmark.get_args(
        ["--device", "cpu", "--model", "densenet121", "--image-size", "32", "-b", "2", "--sections", "compute,control",
         "--control-procs", "2"]), device)
    spec = bench_core.OursSpec(device, args, 2)
    trainer = spec.build()
    weight = next(trainer.model_without_ddp.parameters())
    before = weight.detach().clone()
    step = bench_core.ours_step_fn(trainer, spec.args, bench_core.synthetic_batch(2, 32))
    step()
    assert not torch.equal(before, weight.detach()), "the benchmark's step did not train"
    bench_core.reference_step_fn(device, "densenet121", bench_core.synthetic_batch(2, 32))()
    stop = Stop()
    try:
        calls = bench_dist.agreement_latencies(stop, 2, 2, 3)  # raises if the sums are not 2 images, no stop
        blocking, overlapped = bench_dist.agreement_costs(stop, 2, step, 1)
    finally:
        stop.restore()
    assert len(calls) == 3 and len(blocking) == len(overlapped) == 1
