"""Mixed precision and the optimizer factory in device.py, unit level and through main.py.

bf16 autocast training on CPU, fp16 loss scaling (static and dynamic, overflow
steps skipped), scaler state across checkpoint/resume, one-line errors for
missing apex / torch_npu / CUDA, apex opt level O0, and build_sgd's numerics.

Tiny models keep this file to well under a minute of CPU on 2 cores. fp16
convolution *backward* on CPU is slow (a non-oneDNN path, ~10x bf16), so the
fp16 end-to-end runs take one step per epoch at batch 2.
"""
import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import SMALL_RUN, assert_one_line_error, run_main, write_image_folder
import densenet
import device as device_mod
import main
from device import Device, DeviceError, MixedPrecision, build_mixed_precision, build_sgd, parse_loss_scale

CPU = Device("cpu")


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def tiny(num_classes=3, seed=0):
    torch.manual_seed(seed)
    return densenet.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=num_classes)


def load_real_batch(root, split="train", size=32):
    """Every image of ROOT/SPLIT as one normalised float batch (files decoded with PIL, as the loader does)."""
    images, targets = [], []
    folder = os.path.join(root, split)
    for c, name in enumerate(sorted(os.listdir(folder))):
        for f in sorted(os.listdir(os.path.join(folder, name))):
            with Image.open(os.path.join(folder, name, f)) as im:
                im = im.convert("RGB").resize((size, size), Image.BILINEAR)
                images.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
            targets.append(c)
    x = torch.stack(images).float().div_(255)
    x = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)
    return x, torch.tensor(targets)


def amp_args(*extra):
    """The mixed-precision flags exactly as main.py parses them (its own parser and defaults)."""
    return main.get_args_parser().parse_args(list(extra))


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def fp16_step(mp, model, opt, x, y, inject_inf=False):
    """One training step through MixedPrecision; optionally put an inf into one gradient via a hook."""
    handle = None
    if inject_inf:
        handle = model.classifier.weight.register_hook(lambda g: g * float("inf"))
    with mp.autocast():
        loss = F.cross_entropy(model(x), y)
    assert torch.isfinite(loss), "the injected overflow must be in a gradient, not the loss"
    opt.zero_grad(set_to_none=True)
    mp.backward_and_step(loss, opt, model.parameters())
    if handle is not None:
        handle.remove()
    return float(loss.detach())


@pytest.fixture(scope="module")
def real_batch(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("amp") / "data", classes=3, train_per_class=8,
                              val_per_class=1, size=36)
    return load_real_batch(root)


# ----------------------------------------------------------------------------
# 1. bf16 autocast training on CPU
# ----------------------------------------------------------------------------

def test_bf16_autocast_trains_tiny_model_on_real_images(real_batch, tmp_path):
    x, y = real_batch
    model = tiny()
    mp = MixedPrecision(device=CPU, backend="native", dtype=torch.bfloat16)
    assert mp.scaler is None and "bf16" in mp.describe() and "no loss scaling" in mp.describe()
    opt = build_sgd([{"params": list(model.parameters()), "weight_decay": 0.0}], 0.05, 0.9, CPU)
    losses = []
    for _ in range(12):
        with mp.autocast():
            out = model(x)
            loss = F.cross_entropy(out, y)
        assert out.dtype == torch.bfloat16  # autocast really ran the net in bf16
        opt.zero_grad(set_to_none=True)
        mp.backward_and_step(loss, opt, model.parameters())
        losses.append(float(loss.detach()))
    assert all(math.isfinite(l) for l in losses), losses
    assert losses[-1] < 0.5 * losses[0], losses
    # Master weights, their gradients and the optimizer state stay fp32.
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(s["momentum_buffer"].dtype == torch.float32 for s in opt.state.values())
    assert int(mp.skipped_steps) == 0
    # The saved weights load strictly into a fresh fp32 model and give the same fp32 outputs.
    torch.save({"model": model.state_dict(), "amp": mp.state_dict()}, tmp_path / "ckpt.pth")
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    fresh = tiny(seed=1)
    fresh.load_state_dict(ckpt["model"], strict=True)
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert ckpt["amp"] == {"backend": "native", "skipped_steps": 0}


def _check_amp_auto_dtype(fast_bf16):
    mp = build_mixed_precision(amp_args("--amp"), CPU)
    if fast_bf16:
        assert mp.backend == "native" and mp.dtype == torch.bfloat16
        assert mp.describe().startswith("native torch.autocast(cpu, bf16)")
        # bf16 ignores a static scale: no scaler at all, and the log says the value is not used
        scaled = build_mixed_precision(amp_args("--amp", "--loss_scale_value", "128"), CPU)
        assert scaled.scaler is None and "--loss_scale_value 128 not used" in scaled.describe()
    else:
        # emulated bf16 is slower than fp32 on such a CPU: --amp runs fp32 and says so
        assert mp.backend == "off" and mp.dtype == torch.float32 and mp.scaler is None
        assert mp.describe().startswith("fp32") and "no native bf16" in mp.describe(), mp.describe()
        with mp.autocast():
            assert not torch.is_autocast_enabled("cpu")
    # --amp-dtype bf16 forces bf16 either way
    forced = build_mixed_precision(amp_args("--amp", "--amp-dtype", "bf16"), CPU)
    assert forced.backend == "native" and forced.dtype == torch.bfloat16


def test_amp_auto_dtype_on_this_cpu():
    """Whatever this CPU is: bf16 with native bf16 (AVX512-BF16/AMX, not capped by ONEDNN_MAX_CPU_ISA), else fp32."""
    fast = bool(torch.backends.mkldnn.is_available()) and device_mod._cpu_has_fast_bf16()
    assert CPU.supports_bf16() == fast
    _check_amp_auto_dtype(fast)


@pytest.mark.parametrize("fast_bf16", [True, False], ids=["native-bf16", "no-native-bf16"])
def test_amp_auto_dtype_follows_native_bf16(monkeypatch, fast_bf16):
    monkeypatch.setattr(device_mod, "_cpu_has_fast_bf16", lambda: fast_bf16)
    if fast_bf16 and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN: no native bf16 path whatever the CPU")
    assert CPU.supports_bf16() == fast_bf16
    assert CPU.default_amp_dtype() == (torch.bfloat16 if fast_bf16 else torch.float32)
    _check_amp_auto_dtype(fast_bf16)


def test_onednn_isa_cap_means_no_native_bf16(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert device_mod._cpu_has_fast_bf16() is False
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_vnni")  # any case; still below AVX512-BF16
    assert device_mod._cpu_has_fast_bf16() is False
    assert not CPU.supports_bf16()


def test_bf16_main_run_checkpoint_is_fp32_and_logs_native_amp(tmp_path):
    data = write_image_folder(tmp_path / "data", classes=3, train_per_class=4, val_per_class=1)
    out = tmp_path / "out"
    proc = run_main(["--data-path", data, "--output-dir", str(out), "--model", "densenet121", *SMALL_RUN,
                     "--epochs", "1", "-b", "4", "--lr", "0.01", "--amp", "--amp-dtype", "bf16",
                     "--apex-opt-level", "O2"],
                    env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout
    assert "torch.autocast(cpu, bf16)" in log, log
    # 6. --amp on CPU says native AMP is used, and what the launchers' --apex-opt-level O2 means there.
    assert "native torch.autocast" in log and "--apex-opt-level O2 means autocast here" in log, log
    assert "fp32 weights" in log, log
    losses = [float(l.split("loss: ")[1].split()[0]) for l in log.splitlines() if "loss: " in l]
    assert losses and all(math.isfinite(l) for l in losses), log
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt["model"].values())
    fresh = densenet.build_model("densenet121", num_classes=3)
    fresh.load_state_dict(ckpt["model"], strict=True)
    assert ckpt["amp"]["backend"] == "native" and "scaler" not in ckpt["amp"]


# ----------------------------------------------------------------------------
# 2. fp16 loss scaling: static and dynamic, overflowing steps skipped
# ----------------------------------------------------------------------------

def test_fp16_static_scale_skips_overflow_and_keeps_scale(real_batch):
    x, y = real_batch[0][:8], real_batch[1][:8]
    model = tiny()
    mp = MixedPrecision(device=CPU, backend="native", dtype=torch.float16, loss_scale=1024.0)
    assert "static loss scale 1024" in mp.describe()
    assert mp.current_scale() == 1024.0
    opt = build_sgd([{"params": list(model.parameters()), "weight_decay": 0.0}], 0.05, 0.9, CPU)
    with mp.autocast():
        assert model(x).dtype == torch.float16  # fp16 autocast is supported on CPU in this torch

    before = params_of(model)
    fp16_step(mp, model, opt, x, y, inject_inf=True)
    assert same(before, params_of(model)), "an overflowing step must not touch the parameters"
    assert not opt.state, "no momentum buffers: the optimizer step did not run"
    assert mp.current_scale() == 1024.0
    assert int(mp.skipped_steps) == 1

    fp16_step(mp, model, opt, x, y)
    assert not same(before, params_of(model)), "a clean step updates the parameters"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert mp.current_scale() == 1024.0
    assert int(mp.skipped_steps) == 1
    for _ in range(2):  # a static scale never grows either
        fp16_step(mp, model, opt, x, y)
    assert mp.current_scale() == 1024.0


def test_fp16_dynamic_scale_backs_off_and_grows(real_batch):
    x, y = real_batch[0][:8], real_batch[1][:8]
    assert MixedPrecision(device=CPU, backend="native", dtype=torch.float16).current_scale() == 2.0 ** 16  # GradScaler's default
    model = tiny()
    mp = MixedPrecision(device=CPU, backend="native", dtype=torch.float16, loss_scale="dynamic", growth_interval=2)
    assert "dynamic loss scale" in mp.describe()
    # Start from a modest scale (as a resumed run would) so that the clean steps really are clean.
    mp.load_state_dict({"skipped_steps": 0, "scaler": {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                                       "growth_interval": 2, "_growth_tracker": 0}})
    assert mp.current_scale() == 1024.0
    opt = build_sgd([{"params": list(model.parameters()), "weight_decay": 0.0}], 0.05, 0.9, CPU)

    before = params_of(model)
    fp16_step(mp, model, opt, x, y, inject_inf=True)
    assert same(before, params_of(model))
    assert mp.current_scale() == 512.0 and int(mp.skipped_steps) == 1  # x0.5 on overflow
    fp16_step(mp, model, opt, x, y)
    assert mp.current_scale() == 512.0  # one clean step: not yet
    assert not same(before, params_of(model))
    fp16_step(mp, model, opt, x, y)
    assert mp.current_scale() == 1024.0 and int(mp.skipped_steps) == 1  # x2 after growth_interval clean steps


class PublicScaler:
    """A GradScaler that refuses its private attributes and records which public methods the step calls."""

    def __init__(self, scaler):
        self._scaler, self.calls = scaler, []

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(f"GradScaler.{name} is private")
        if name == "get_scale":
            raise AssertionError("get_scale() syncs the host with the device: not in the training step")
        self.calls.append(name)
        return getattr(self._scaler, name)


@pytest.mark.parametrize("loss_scale", [1024.0, "dynamic"])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_fp16_step_uses_public_scaler_api_and_counts_skips_on_the_device(real_batch, loss_scale, clip):
    x, y = real_batch[0][:8], real_batch[1][:8]
    model = tiny()
    mp = MixedPrecision(device=CPU, backend="native", dtype=torch.float16, loss_scale=loss_scale)
    if loss_scale == "dynamic":  # a modest scale, so that the clean steps really are clean
        mp.load_state_dict({"scaler": {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                       "growth_interval": 2000, "_growth_tracker": 0}})
    scaler = mp.scaler
    mp.scaler = PublicScaler(scaler)
    opt = build_sgd([{"params": list(model.parameters()), "weight_decay": 0.0}], 0.05, 0.9, CPU)
    before = params_of(model)
    for step in range(3):
        handle = model.classifier.weight.register_hook(lambda g: g * float("inf")) if step == 1 else None
        with mp.autocast():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        mp.backward_and_step(loss, opt, model.parameters(), clip_grad_norm=clip)
        if handle is not None:
            handle.remove()
        if step == 0:
            assert not same(before, params_of(model)), "a clean step updates the parameters"
            after_clean = params_of(model)
        if step == 1:
            assert same(after_clean, params_of(model)), "the overflowing step must not touch the parameters"
    assert isinstance(mp.skipped_steps, torch.Tensor) and int(mp.skipped_steps) == 1
    # unscale_ only where clipping needs the real gradients (step() unscales them otherwise)
    assert mp.scaler.calls.count("unscale_") == (3 if clip else 0)
    # a static scale stays what was given; a dynamic one halved at the overflow
    assert scaler.get_scale() == (1024.0 if loss_scale != "dynamic" else 512.0)
    if loss_scale != "dynamic":
        assert mp.state_dict()["scaler"]["scale"] == 1024.0


def test_parse_loss_scale():
    assert parse_loss_scale(None) is None
    assert parse_loss_scale("dynamic") == "dynamic" and parse_loss_scale("Dynamic") == "dynamic"
    assert parse_loss_scale("128") == 128.0
    for bad in ("0", "-4", "inf", "nan", "big"):
        with pytest.raises(DeviceError):
            parse_loss_scale(bad)


# ----------------------------------------------------------------------------
# 3. Scaler state across checkpoint and resume
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("loss_scale", [1024.0, "dynamic"])
def test_scaler_state_round_trips_through_a_checkpoint(real_batch, tmp_path, loss_scale):
    x, y = real_batch[0][:8], real_batch[1][:8]
    model = tiny()
    mp = MixedPrecision(device=CPU, backend="native", dtype=torch.float16, loss_scale=loss_scale, growth_interval=3)
    if loss_scale == "dynamic":
        mp.load_state_dict({"scaler": {"scale": 256.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                       "growth_interval": 3, "_growth_tracker": 0}})
    opt = build_sgd([{"params": list(model.parameters()), "weight_decay": 0.0}], 0.05, 0.9, CPU)
    fp16_step(mp, model, opt, x, y, inject_inf=True)
    fp16_step(mp, model, opt, x, y)
    state = mp.state_dict()
    torch.save({"amp": state}, tmp_path / "c.pth")
    loaded = torch.load(tmp_path / "c.pth", weights_only=True)["amp"]
    fresh = MixedPrecision(device=CPU, backend="native", dtype=torch.float16, loss_scale=loss_scale, growth_interval=3)
    fresh.load_state_dict(loaded)
    assert int(fresh.skipped_steps) == int(mp.skipped_steps) == 1
    assert fresh.current_scale() == mp.current_scale() == (1024.0 if loss_scale != "dynamic" else 128.0)
    assert fresh.state_dict() == state
    if loss_scale == "dynamic":
        assert state["scaler"]["_growth_tracker"] == 1


def test_fp16_static_scale_saved_and_resumed_end_to_end(tmp_path):
    data = write_image_folder(tmp_path / "data", classes=2, train_per_class=2, val_per_class=1)
    out = tmp_path / "out"
    common = ["--data-path", data, "--output-dir", str(out), "--model", "densenet121", *SMALL_RUN, "-b", "2",
              "--max-steps", "1", "--lr", "0.01", "--amp", "--amp-dtype", "fp16", "--loss_scale_value", "512"]
    env = {"OMP_NUM_THREADS": "1"}
    first = run_main([*common, "--epochs", "1"], env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "static loss scale 512" in first.stdout, first.stdout
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["amp"]["scaler"]["scale"] == 512
    # the checkpoint counts the overflow-skipped steps the step line reported
    reported = [int(l.rsplit("skipped: ", 1)[1]) for l in first.stdout.splitlines() if "skipped: " in l]
    assert reported and ckpt["amp"]["skipped_steps"] == reported[-1], first.stdout

    second = run_main([*common, "--epochs", "2", "--resume", str(out / "checkpoint.pth")], env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"Resumed from {out / 'checkpoint.pth'}: weights after epoch 0; continuing at epoch 1, step 0" in \
        second.stdout, second.stdout
    assert "Epoch: [1]" in second.stdout and "Epoch: [0]" not in second.stdout, second.stdout
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["position"]["epoch"] == 2 and ckpt["amp"]["scaler"]["scale"] == 512


# ----------------------------------------------------------------------------
# 4. One-line errors for what is not installed / not present
# ----------------------------------------------------------------------------

def _importable(name):
    try:
        __import__(name)
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("err") / "data", classes=2, train_per_class=1,
                              val_per_class=1, size=16)


@pytest.mark.parametrize("flags", [["--amp", "--amp-backend", "apex"], ["--apex"]], ids=["amp-backend", "apex"])
def test_apex_on_cpu_is_one_line(small_data, tmp_path, flags):
    """On the CPU apex is refused before anything else, installed or not."""
    proc = run_main(["--data-path", small_data, "--output-dir", str(tmp_path), "--model", "densenet121",
                     *SMALL_RUN, "--epochs", "1", *flags], env={"OMP_NUM_THREADS": "1"})
    assert_one_line_error(proc, "apex amp runs on NPU/CUDA only")
    line = proc.stderr.strip()
    assert flags[-1] in line and "--amp" in line, line


@pytest.mark.parametrize("flags", [["--amp", "--amp-backend", "apex"], ["--apex"]], ids=["amp-backend", "apex"])
@pytest.mark.parametrize("dev_type", ["npu", "cuda"])
def test_apex_missing_says_where_to_get_it(monkeypatch, flags, dev_type):
    monkeypatch.setattr(device_mod, "_import_apex_amp", lambda: None)  # as where apex is not built
    with pytest.raises(DeviceError) as e:
        build_mixed_precision(amp_args(*flags), Device(dev_type, 0))
    line = str(e.value)
    assert "\n" not in line and flags[-1] in line, line
    if dev_type == "npu":
        assert "apex is not installed" in line and "gitee.com/ascend/apex" in line, line
    else:  # NVIDIA's apex no longer has apex.amp: point to native torch.amp
        assert "apex.amp is not available" in line and "--amp" in line, line


@pytest.mark.skipif(_importable("torch_npu"), reason="torch_npu is installed here")
def test_npu_without_torch_npu_is_one_line(small_data, tmp_path):
    args = ["--data-path", small_data, "--output-dir", str(tmp_path), *SMALL_RUN, "--device", "npu"]
    proc = run_main(args, env={"OMP_NUM_THREADS": "1"})
    assert_one_line_error(proc, "torch_npu")
    assert "CANN" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible here")
def test_cuda_without_gpu_is_one_line(small_data, tmp_path):
    args = ["--data-path", small_data, "--output-dir", str(tmp_path), *SMALL_RUN, "--device", "cuda"]
    proc = run_main(args, env={"OMP_NUM_THREADS": "1"})
    assert_one_line_error(proc, "CUDA")


def test_apex_on_cpu_is_refused(monkeypatch):
    import device as device_mod
    monkeypatch.setattr(device_mod, "_import_apex_amp", lambda: object())  # as if apex were built here
    with pytest.raises(DeviceError, match="NPU/CUDA only"):
        build_mixed_precision(amp_args("--apex"), CPU)


# ----------------------------------------------------------------------------
# 5. The apex path (only where apex is built; CI has none)
# ----------------------------------------------------------------------------

def test_apex_amp_backend_where_installed(tmp_path):
    amp = pytest.importorskip("apex.amp", reason="CI has no apex (built from source, never PyPI's 'apex')")
    assert amp is not None
    dev_type = "npu" if _importable("torch_npu") and torch.npu.is_available() else \
        "cuda" if torch.cuda.is_available() else None
    if dev_type is None:
        pytest.skip("apex amp needs an NPU or CUDA device")
    device = Device(dev_type, 0)
    mp = build_mixed_precision(amp_args("--apex", "--apex-opt-level", "O1", "--loss_scale_value", "128"), device)
    assert mp.backend == "apex" and "opt_level=O1" in mp.describe() and "128" in mp.describe()
    model = tiny().to(device.torch_device)
    opt = build_sgd([{"params": list(model.parameters()), "weight_decay": 0.0}], 0.05, 0.9, device, amp=mp)
    model, opt = mp.initialize(model, opt)
    x = torch.randn(4, 3, 32, 32, device=device.torch_device)
    y = torch.tensor([0, 1, 2, 0], device=device.torch_device)
    before = params_of(model)
    with mp.autocast():
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    mp.backward_and_step(loss, opt, model.parameters())
    assert not same(before, params_of(model))
    state = mp.state_dict()
    assert "apex" in state
    torch.save(state, tmp_path / "a.pth")


# ----------------------------------------------------------------------------
# 6. --apex-opt-level O0 means fp32
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [["--amp", "--apex-opt-level", "O0"], ["--apex", "--apex-opt-level", "O0"], []])
def test_opt_level_O0_or_no_amp_is_fp32(flags):
    mp = build_mixed_precision(amp_args(*flags), CPU)  # --apex O0 needs no apex: nothing to initialise
    assert mp.backend == "off" and mp.dtype == torch.float32 and mp.scaler is None
    assert mp.describe().startswith("fp32")
    model = tiny()
    with mp.autocast():
        assert not torch.is_autocast_enabled("cpu")
        assert model(torch.randn(2, 3, 32, 32)).dtype == torch.float32
    model2, opt = mp.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert model2 is model


def test_native_describe_explains_O2():
    text = build_mixed_precision(amp_args("--amp", "--amp-dtype", "bf16", "--apex-opt-level", "O2"), CPU).describe()
    assert text.startswith("native torch.autocast(cpu, bf16)") and "--apex-opt-level O2 means autocast here" in text
    other = build_mixed_precision(amp_args("--amp", "--amp-dtype", "bf16", "--apex-opt-level", "O1"), CPU).describe()
    assert "O2" not in other and "--apex-opt-level O1 means autocast here" in other
    assert "apex" not in build_mixed_precision(amp_args("--amp", "--amp-dtype", "bf16"), CPU).describe()


# ----------------------------------------------------------------------------
# 7. build_sgd
# ----------------------------------------------------------------------------

def test_build_sgd_cpu_is_foreach_and_matches_plain_sgd(real_batch):
    x, y = real_batch[0][:8], real_batch[1][:8]
    a = tiny()
    b = copy.deepcopy(a)

    def groups(m):
        decay = [p for p in m.parameters() if p.ndim > 1]
        no_decay = [p for p in m.parameters() if p.ndim <= 1]
        return [{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}]

    fast = build_sgd(groups(a), lr=0.1, momentum=0.9, device=CPU)
    plain = torch.optim.SGD(groups(b), lr=0.1, momentum=0.9, foreach=False)
    assert type(fast) is torch.optim.SGD and fast.defaults["foreach"] is True
    assert fast.defaults["momentum"] == 0.9 and fast.defaults["lr"] == 0.1
    assert [g["weight_decay"] for g in fast.param_groups] == [1e-4, 0.0]
    for _ in range(4):
        for model, opt in ((a, fast), (b, plain)):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not same(params_of(a), params_of(tiny()))
