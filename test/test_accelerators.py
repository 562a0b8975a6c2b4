"""Issue 13: the Ascend NPU and CUDA paths, checked on a CPU.

What would break on first contact with an NPU or a GPU -- apex O2's zero_grad, a gloo side group under an
NPU-bound default group, NpuFusedSGD at O3, emulated bf16 on pre-Ampere GPUs, a short --device_ids, float64
on the device, an fp16 EMA, RNG states across device types, NVIDIA's apex without amp, emulated bf16 on CPUs
-- each reproduced here with real parts: the test-only apex stand-in (test/apex_standin, the one stand-in),
real subprocesses, real files. Devices this machine lacks are `Device`s whose decisions are device.py's and
whose tensors live on the CPU (FakeNpu), or monkeypatched torch.cuda queries; nothing initialises a real
process group in this process, and renaming the privateuse1 backend (process-global, irreversible) happens
in a subprocess only.

Each test's first comment says what the code before the fix did.
"""
import importlib
import json
import math
import re
import os
import shutil
import subprocess
import sys
import textwrap
import types
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO, SMALL_RUN, assert_ok, write_image_folder
import cli
import data as data_lib
import densenet
import device as device_lib
import engine
import main
import recipe
import trainer as trainer_lib
import comm
import launch as launch_lib
import utils
from device import Device, DeviceError

STANDIN = os.path.join(REPO, "test", "apex_standin")
CPU = Device("cpu")

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@dataclass(frozen=True)
class FakeNpu(Device):
    """An "npu" Device -- every decision device.py makes for an NPU -- whose tensors live on the CPU
    (torch.device("npu") does not exist without torch_npu)."""
    type: str = "npu"
    index: int = 0

    @property
    def torch_device(self):
        return torch.device("cpu")


NPU = FakeNpu()


def parse(*flags):
    """main.py's own parser (no dataset needed with --synthetic)."""
    return main.get_args_parser().parse_args(["--synthetic", *flags])


def tiny_densenet(seed=0):
    torch.manual_seed(seed)
    return densenet.DenseNet(growth_rate=4, block_config=(2,), num_init_features=8, bn_size=2, num_classes=3)


@pytest.fixture
def apex():
    """The apex stand-in on sys.path for one test; afterwards gone again (path, modules, patched zero_grad)."""
    assert "apex" not in sys.modules, "a real or stand-in apex is already imported"
    sys.path.insert(0, STANDIN)
    try:
        module = importlib.import_module("apex")
        assert getattr(module, "__standin__", False)
        yield module
        module.amp._standin_reset()
    finally:
        sys.path.remove(STANDIN)
        for name in [n for n in sys.modules if n == "apex" or n.startswith("apex.")]:
            del sys.modules[name]


def apex_o2_trainer(monkeypatch, ema_decay=0.5):
    """A Trainer as build_trainer makes it under --apex --apex-opt-level O2 (tiny DenseNet, CPU)."""
    monkeypatch.setenv("DENSENET_APEX_ON_CPU", "1")
    amp = device_lib.build_mixed_precision(parse("--apex", "--apex-opt-level", "O2", "--loss_scale_value", "1024"),
                                           CPU)
    assert amp.backend == "apex" and amp.opt_level == "O2"
    model = tiny_densenet()
    optimizer = device_lib.build_sgd(trainer_lib.param_groups(model, 1e-4, 0.0), 0.1, 0.9, CPU, amp)
    model, optimizer = amp.initialize(model, optimizer)
    return trainer_lib.Trainer(model=model, model_without_ddp=model, optimizer=optimizer, amp=amp, device=CPU,
                               normalize=data_lib.DeviceNormalize(CPU.torch_device), criterion=nn.CrossEntropyLoss(),
                               mixup=recipe.MixupCutmix(3), ema=recipe.ModelEma(model, ema_decay))


def uint8_batch(n=4, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.arange(n) % 3


# ----------------------------------------------------------------------------
# 1. apex O2: zero_grad takes no arguments
# ----------------------------------------------------------------------------

def test_apex_o2_zero_grad_takes_no_set_to_none(apex, monkeypatch):
    # Old: main.py called optimizer.zero_grad(set_to_none=True) on every backend -> TypeError under apex O2.
    t = apex_o2_trainer(monkeypatch)
    with pytest.raises(TypeError):
        t.optimizer.zero_grad(set_to_none=True)  # apex O2's replacement takes no arguments
    t.amp.zero_grad(t.optimizer)  # what the step calls instead


def test_trainer_step_runs_under_apex_o2(apex, monkeypatch):
    # Old: the training step died on its first zero_grad(set_to_none=True) under apex O2 (TypeError).
    t = apex_o2_trainer(monkeypatch)
    conv = t.model_without_ddp.features.conv0.weight
    bn = t.model_without_ddp.features.norm0.weight
    assert conv.dtype == torch.float16 and bn.dtype == torch.float32  # O2: fp16 model, fp32 BatchNorm
    before = conv.detach().clone()
    images, targets = uint8_batch()
    for _ in range(2):  # the second step goes through the lazily created fp32 master weights
        output, loss, _ = t.step(images, targets, lr=0.1, update_ema=True)
        assert output.dtype == torch.float32 and math.isfinite(float(loss))
    assert not torch.equal(conv.detach(), before)
    masters = list(apex.amp.master_params(t.optimizer))
    assert masters and all(p.dtype == torch.float32 for p in masters)
    assert all(p.dtype == torch.float32 for p in t.ema.module.parameters())
    assert t.ema.num_updates == 2


def test_ema_of_an_apex_o2_model_evaluates_its_own_weights(apex, monkeypatch):
    # Old: ModelEma deep-copied apex's patched instance forward, a closure over the live model: evaluating the
    # EMA ran the trained model (--model-ema under --apex logged the model's Acc@1 twice).
    t = apex_o2_trainer(monkeypatch)
    x = torch.randn(2, 3, 16, 16)
    t.ema.module.eval()
    with torch.no_grad():
        before = t.ema.module(x)
        t.model_without_ddp.classifier.weight.fill_(10.0)  # the live model changes; the average did not
        after = t.ema.module(x)
    assert before.dtype == torch.float32
    torch.testing.assert_close(after, before, rtol=0, atol=0)


# ----------------------------------------------------------------------------
# 2. HCCL default group + gloo side group
# ----------------------------------------------------------------------------

NPU_SIDE_GROUP_SCRIPT = textwrap.dedent("""
    import types
    import torch
    import torch.distributed as dist

    # What importing torch_npu does (torch_npu/_init/registry/backend.py): the privateuse1 device becomes "npu"
    # with a device module; its default backend (hccl) serves "npu". gloo here plays that backend for "npu".
    torch.utils.rename_privateuse1_backend("npu")
    npu = types.ModuleType("npu")
    npu.device_count = lambda: 1
    npu.is_available = lambda: True
    torch._register_device_module("npu", npu)
    DEFAULT_BACKEND = "cpu:gloo,npu:gloo"

    dist.init_process_group(DEFAULT_BACKEND, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=torch.device("npu", 0))
    print("bound to", dist.distributed_c10d._get_default_group().bound_device_id)
    try:
        dist.new_group(backend="gloo")
        print("side group with device_id: ok")
    except Exception as e:
        print("side group with device_id failed:", type(e).__name__, e)
    dist.destroy_process_group()

    dist.init_process_group(DEFAULT_BACKEND, store=dist.HashStore(), rank=0, world_size=1)
    group = dist.new_group(backend="gloo")
    t = torch.tensor([2.0, 3.0], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    print("side group without device_id: ok", t.tolist())
    dist.destroy_process_group()
""")


def test_gloo_side_group_fails_under_a_default_group_bound_to_an_npu():
    # Old: init_distributed passed device_id=npu:N for hccl, and our gloo control group then failed with
    # "No backend type associated with device type npu" (reproduced here with torch's own c10d).
    proc = subprocess.run([sys.executable, "-c", NPU_SIDE_GROUP_SCRIPT], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "bound to npu:0" in out, out
    assert "side group with device_id failed: RuntimeError No backend type associated with device type npu" in out, out
    assert "side group without device_id: ok [2.0, 3.0]" in out, out


@pytest.mark.parametrize("dev, backend, binds", [
    (NPU, "hccl", False), (Device("cuda", 0), "nccl", True), (CPU, "gloo", False), (NPU, "gloo", False)],
    ids=["npu-hccl", "cuda-nccl", "cpu-gloo", "npu-gloo"])
def test_init_distributed_binds_the_device_only_for_nccl(monkeypatch, dev, backend, binds):
    # Old: device_id was passed for "hccl" too, binding the default group to the NPU (see the test above).
    calls = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    monkeypatch.setattr(dist, "new_group", lambda **kw: calls.setdefault("new_group", kw) or "control group")
    monkeypatch.setattr(comm, "_control_group", None)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    comm.init_distributed(launch_lib.Launch(0, 0, 1, 1, "torchrun"), dev, backend, "env://", 60)
    assert calls["init"]["backend"] == backend
    if binds:
        assert calls["init"]["device_id"] == torch.device("cuda", 0)
    else:
        assert "device_id" not in calls["init"], calls["init"]
    assert calls["new_group"]["backend"] == "gloo"  # (and its own timeout: see comm.init_distributed)


# ----------------------------------------------------------------------------
# 3. apex O3 on an NPU: plain torch SGD (NpuFusedSGD is O1/O2 only)
# ----------------------------------------------------------------------------

def test_apex_o3_on_npu_uses_plain_sgd_and_o2_the_fused_one(apex):
    # Old: build_sgd returned NpuFusedSGD for any --apex run on an NPU, and amp.initialize refused it at O3
    # (and MixedPrecision.initialize passed combine_grad=True, which Ascend's amp also refuses at O3).
    groups = lambda m: trainer_lib.param_groups(m, 1e-4, 0.0)  # noqa: E731
    o3 = device_lib.build_mixed_precision(parse("--apex", "--apex-opt-level", "O3"), NPU)
    assert o3.backend == "apex" and o3.opt_level == "O3"
    assert any("plain torch SGD" in note for note in o3.notes) and "plain torch SGD" in o3.describe()
    model = tiny_densenet()
    sgd = device_lib.build_sgd(groups(model), 0.1, 0.9, NPU, o3)
    assert type(sgd) is torch.optim.SGD
    model, sgd = o3.initialize(model, sgd)  # the stand-in's amp.initialize, with combine_grad as on an NPU
    assert model.classifier.weight.dtype == torch.float16

    o2 = device_lib.build_mixed_precision(parse("--apex", "--apex-opt-level", "O2"), NPU)
    assert not o2.notes
    model = tiny_densenet()
    fused = device_lib.build_sgd(groups(model), 0.1, 0.9, NPU, o2)
    assert isinstance(fused, apex.optimizers.NpuFusedSGD)
    model, fused = o2.initialize(model, fused)  # combine_grad=True with the fused optimizer, as on an NPU
    assert model.classifier.weight.dtype == torch.float16

    # Why: Ascend's amp refuses its fused optimizer at O3.
    model = tiny_densenet()
    with pytest.raises(RuntimeError, match="npu fused optimizer can only be used when opt_level='O1'"):
        apex.amp.initialize(model, apex.optimizers.NpuFusedSGD(groups(model), lr=0.1, momentum=0.9),
                            opt_level="O3", verbosity=0)


# ----------------------------------------------------------------------------
# 4. bf16 on CUDA: hardware only, not emulated
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("ampere", [False, True], ids=["pre-ampere", "ampere"])
def test_cuda_bf16_counts_only_native_support(monkeypatch, ampere):
    # Old: torch.cuda.is_bf16_supported() (including_emulation=True by default) is True on a V100/T4, so
    # --amp picked emulated bf16 there.
    def is_bf16_supported(including_emulation=True):  # torch's rule: emulation counts unless told otherwise
        return True if ampere else including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    gpu = Device("cuda", 0)
    assert gpu.supports_bf16() is ampere
    assert gpu.default_amp_dtype() == (torch.bfloat16 if ampere else torch.float16)


# ----------------------------------------------------------------------------
# 5. --device_ids shorter than the ranks on the node
# ----------------------------------------------------------------------------

@pytest.fixture
def eight_gpus(monkeypatch):
    bound = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.accelerator, "set_device_index", bound.append)
    return bound


def test_short_device_ids_is_one_clear_error(eight_gpus):
    # Old: device_ids[local_rank] raised a bare IndexError (a traceback) on local rank 3 of --device_ids 0,1.
    with pytest.raises(DeviceError) as e:
        device_lib.resolve_device("cuda", local_rank=3, device_ids=[0, 1])
    assert isinstance(e.value, cli.UserError)
    message = str(e.value)
    assert "\n" not in message and "--device_ids 0,1" in message and "local rank 3" in message, message
    assert eight_gpus == []  # nothing bound
    assert device_lib.resolve_device("cuda", local_rank=1, device_ids=[4, 5]) == Device("cuda", 5)
    assert eight_gpus == [5]


def test_short_device_ids_through_main_is_one_line_and_exit_2(eight_gpus, monkeypatch, tmp_path, capsys):
    # Old: the IndexError came out of main.py as a traceback.
    for key, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    args = parse("--device", "cuda", "--device_ids", "0,1", "-b", "8", "--output-dir", str(tmp_path))
    assert cli.run_tool(main.main, args) == cli.EXIT_USER_ERROR
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: --device_ids 0,1"), err
    assert not comm.is_dist()


# ----------------------------------------------------------------------------
# 6. No float64 on the device
# ----------------------------------------------------------------------------

class DtypeRecorder(TorchDispatchMode):
    """Every dtype an ATen op produces while active."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.dtypes.add(t.dtype)
        return out


def test_meter_and_accuracy_counts_make_no_float64_on_the_device():
    # Old: the meters were float64 device tensors (loss*n, correct@1, correct@5, n): HCCL and Ascend have none.
    g = torch.Generator().manual_seed(0)
    recorder = DtypeRecorder()
    with recorder:
        meter = engine.Meter(CPU.torch_device)
        for _ in range(5):  # 5 steps of 3 images, 3 classes
            output, targets = torch.randn(3, 3, generator=g), torch.randint(0, 3, (3,), generator=g)
            counts = utils.accuracy_counts(output, targets)
            meter.update(nn.functional.cross_entropy(output, targets, reduction="sum"), output, targets)
    assert torch.float64 not in recorder.dtypes, recorder.dtypes
    assert meter.loss.dtype == torch.float32 and meter.counts.dtype == torch.int64
    assert counts.dtype == torch.int64 and counts.tolist()[-1] == 3
    loss, acc1, acc5, n = meter.read(all_ranks=True)
    assert n == 15 and isinstance(n, int) and acc5 == 100.0 and math.isfinite(loss)
    assert acc1 * 15 / 100 == pytest.approx(round(acc1 * 15 / 100), abs=1e-9)  # a whole number of images


def test_all_reduce_is_exact_host_arithmetic():
    # Old: all_reduce_sum(values, device) summed a float64 tensor on the device.
    out = comm.all_reduce([2 ** 40 + 1, 3, 0.5])
    assert out == [2 ** 40 + 1, 3.0, 0.5] and all(type(v) is float for v in out)  # float32 would lose the +1
    assert comm.all_reduce([1, 7], op="max") == [1.0, 7.0]


# ----------------------------------------------------------------------------
# 7. The EMA is fp32 even when the model is fp16
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("target, fp16_result", [(1.5, 1.0009765625), (1.25, 1.0)])
def test_ema_of_an_fp16_model_is_fp32(target, fp16_result):
    # Old: the EMA was a deep copy in the model's dtype: under fp16, 1.0 -> 1.5 moved by 9.8e-4 instead of
    # 5e-4, and 1.0 -> 1.25 (2.5e-4) did not move at all.
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    model.half()
    ema = recipe.ModelEma(model, 0.999)
    assert all(p.dtype == torch.float32 for p in ema.module.parameters())
    with torch.no_grad():
        model.weight.fill_(target)
    ema.update(model)
    moved = float(ema.module.weight) - 1.0
    assert moved == pytest.approx(0.001 * (target - 1.0), rel=1e-4)
    fp16 = torch.ones(1, dtype=torch.float16).lerp_(torch.full((1,), target, dtype=torch.float16), 0.001)
    assert float(fp16) == fp16_result  # what an fp16 EMA would hold: the premise of the test


# ----------------------------------------------------------------------------
# 8. RNG states across device types
# ----------------------------------------------------------------------------

class FakeDeviceModule:
    """torch.cuda / torch.npu as far as rng_state/set_rng_state use them; records set_rng_state calls."""

    def __init__(self):
        self.restored = []

    def get_rng_state(self, index):
        return torch.arange(8, dtype=torch.uint8)

    def set_rng_state(self, state, index):
        self.restored.append((state, index))


def test_rng_state_restores_the_accelerator_generator_only_on_the_same_device_type(monkeypatch):
    # Old: a checkpoint's CUDA generator state was fed to the NPU's set_rng_state (and any device's).
    module = FakeDeviceModule()
    monkeypatch.setattr(Device, "module", lambda self: module)
    saved = utils.rng_state(CPU)
    saved["device"], saved["device_type"] = torch.full((8,), 7, dtype=torch.uint8), "cuda"
    utils.set_rng_state(saved, NPU)
    assert module.restored == []
    utils.set_rng_state(saved, Device("cuda", 1))
    assert len(module.restored) == 1 and module.restored[0][1] == 1 and torch.equal(module.restored[0][0],
                                                                                    saved["device"])
    state = utils.rng_state(NPU)
    assert state["device_type"] == "npu" and torch.equal(state["device"], torch.arange(8, dtype=torch.uint8))


# ----------------------------------------------------------------------------
# 9. --apex on a GPU: NVIDIA's apex has no amp any more
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [["--amp", "--amp-backend", "apex"], ["--apex"]], ids=["amp-backend", "apex"])
def test_apex_on_cuda_without_apex_amp_says_use_amp(monkeypatch, flags):
    # Old: "apex is not installed ... NVIDIA: https://github.com/NVIDIA/apex": a package without apex.amp since 2025.
    monkeypatch.setattr(device_lib, "_import_apex_amp", lambda: None)
    with pytest.raises(DeviceError) as e:
        device_lib.build_mixed_precision(parse(*flags), Device("cuda", 0))
    message = str(e.value)
    assert "\n" not in message and "removed apex.amp" in message and "use --amp" in message, message


# ----------------------------------------------------------------------------
# 10. --amp on a CPU without native bf16 is fp32
# ----------------------------------------------------------------------------

def test_cpu_amp_policy_follows_native_bf16(monkeypatch):
    # Old: --amp on any CPU meant bf16 autocast, emulated (slower than fp32) on CPUs without AVX512-BF16/AMX.
    monkeypatch.setattr(device_lib, "_cpu_has_fast_bf16", lambda: False)
    amp = device_lib.build_mixed_precision(parse("--amp"), CPU)
    assert amp.backend == "off" and amp.dtype == torch.float32
    assert amp.describe().startswith("fp32") and "no native bf16" in amp.describe()
    forced = device_lib.build_mixed_precision(parse("--amp", "--amp-dtype", "bf16"), CPU)
    assert forced.backend == "native" and forced.dtype == torch.bfloat16
    if torch.backends.mkldnn.is_available():
        monkeypatch.setattr(device_lib, "_cpu_has_fast_bf16", lambda: True)
        amp = device_lib.build_mixed_precision(parse("--amp"), CPU)
        assert amp.backend == "native" and amp.dtype == torch.bfloat16 and "no native bf16" not in amp.describe()


def test_onednn_isa_cap_means_no_native_bf16(monkeypatch):
    # Old: /proc/cpuinfo alone decided, though ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN emulate bf16.
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert device_lib._cpu_has_fast_bf16() is False
    assert CPU.supports_bf16() is False and CPU.default_amp_dtype() == torch.float32


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("acc") / "data", val_per_class=2, size=32)


def start_main(args, env):
    """main.py ARGS in a subprocess, not waited for (conftest.run_main's environment rules)."""
    return subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"), *args], cwd=REPO,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=600):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


APEX_ENV = {"PYTHONPATH": STANDIN, "DENSENET_APEX_ON_CPU": "1", "OMP_NUM_THREADS": "1"}
APEX_FLAGS = ["--model", "densenet121", "-b", "8", "--max-steps", "2", "--apex", "--apex-opt-level", "O2",
              "--loss_scale_value", "1024", "--model-ema", "--model-ema-steps", "1"]


@pytest.fixture(scope="module")
def e2e_runs(images, tmp_path_factory):
    """The main.py runs of sections 10 and 11, two at a time (each single-threaded):
    --amp on a CPU capped at AVX2 (1 step); two epochs under apex O2, then --resume auto to a third (1 step),
    with run 1's checkpoint kept aside."""
    root = tmp_path_factory.mktemp("e2e")
    out = root / "apex_out"
    common = ["--data-path", images, "--output-dir", str(out), *SMALL_RUN, *APEX_FLAGS, "--keep-checkpoints", "all"]
    capped = start_main(["--data-path", images, "--output-dir", str(root / "amp_out"), *SMALL_RUN, "--model",
                         "densenet121", "-b", "8", "--epochs", "1", "--max-steps", "1", "--amp"],
                        env={"OMP_NUM_THREADS": "1", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    try:
        first = finish(start_main([*common, "--epochs", "2"], env=APEX_ENV))
    finally:
        capped = finish(capped)
    runs = {"capped": capped, "first": first, "out": out}
    if first.returncode == 0:
        shutil.copy(out / "checkpoint.pth", root / "after_run_1.pth")
        runs["second"] = finish(start_main([*common, "--epochs", "3", "--resume", "auto", "--max-steps", "1"],
                                           env=APEX_ENV))
    return runs


def test_main_amp_on_a_cpu_capped_below_bf16_runs_fp32(e2e_runs):
    # Old: main.py --amp logged torch.autocast(cpu, bf16) and trained in emulated bf16.
    proc = e2e_runs["capped"]
    assert_ok(proc)
    line = next(l for l in proc.stdout.splitlines() if "precision:" in l)
    assert "precision: fp32 (no mixed precision)" in line and "no native bf16" in line, line
    assert "autocast" not in line


# ----------------------------------------------------------------------------
# 11. End to end: main.py --apex O2 on a CPU with the stand-in, then --resume auto
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def apex_runs(e2e_runs):
    assert_ok(e2e_runs["first"])
    assert_ok(e2e_runs["second"])
    return e2e_runs["out"], e2e_runs["first"], e2e_runs["second"]


def test_apex_o2_run_trains_evaluates_and_checkpoints(apex_runs):
    # Old: the first step's zero_grad(set_to_none=True) raised TypeError under apex O2.
    out, first, _ = apex_runs
    line = next(l for l in first.stdout.splitlines() if "precision:" in l)
    assert "precision: apex amp opt_level=O2, loss scale 1024" in line, line
    assert first.stdout.count(" * Acc@1") == 2 and first.stdout.count(" * EMA Acc@1") == 2, first.stdout
    records = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for r in records:  # 2 steps (1 after the resume) of 8 images: exact integer counts, no float sums
        assert r["images"] == (8 if r["epoch"] == 2 else 16) and type(r["images"]) is int and r["val_images"] == 6
        assert math.isfinite(r["train_loss"])
    # The EMA is evaluated with its own (fp32, barely moved) weights, not the trained model's.
    assert records[0]["val_ema_loss"] != records[0]["val_loss"]
    assert all((out / f"model_{e}.pth").is_file() for e in range(3)) and (out / "model_best.pth").is_file()


def test_apex_o2_checkpoint_is_fp32(apex_runs):
    # Old: the EMA kept the model's dtype (fp16 under O2); the weights' dtype was never checked.
    out, _, _ = apex_runs
    ckpt = torch.load(out.parent / "after_run_1.pth", weights_only=True)  # before --resume overwrote it
    # apex O2's state_dict hook (O2StateDictHook) casts the fp16 model's tensors to fp32: the saved weights load
    # into a plain fp32 model.
    floats = {k: v.dtype for k, v in ckpt["model"].items() if v.is_floating_point()}
    assert floats and set(floats.values()) == {torch.float32}, floats
    assert {v.dtype for v in ckpt["model_ema"].values() if v.is_floating_point()} == {torch.float32}
    assert ckpt["model_ema_updates"] == 4
    assert ckpt["amp"]["backend"] == "apex" and ckpt["amp"]["apex"]["loss_scaler0"]["loss_scale"] == 1024.0
    plain = densenet.build_model("densenet121", num_classes=3)
    plain.load_state_dict(ckpt["model"], strict=True)
    assert ckpt["position"]["epoch"] == 2


def test_apex_o2_resume_auto_continues(apex_runs):
    # Old: the resumed run died on its first step like the fresh one (apex O2 zero_grad).
    out, _, second = apex_runs
    assert "Resumed from" in second.stdout and "continuing at epoch 2, step 0" in second.stdout, second.stdout
    assert "Epoch: [2]" in second.stdout and "Epoch: [1]" not in second.stdout
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["position"]["epoch"] == 3 and ckpt["model_ema_updates"] == 5
    assert {v.dtype for v in ckpt["model_ema"].values() if v.is_floating_point()} == {torch.float32}


# ----------------------------------------------------------------------------
# 12. NPU decisions that need no NPU
# ----------------------------------------------------------------------------

def test_npu_device_decisions():
    # Old: Device had no channels_last_default (the NHWC rule sat inline in main.py, testable only by a run);
    # the rest is the NPU contract that rule sits beside (hccl, fp16 AMP, no bf16 by default).
    npu = Device("npu", 0)
    assert npu.dist_backend == "hccl" and npu.is_accelerator
    assert npu.channels_last_default is False
    assert Device("cuda", 0).channels_last_default is True and CPU.channels_last_default is True
    assert npu.default_amp_dtype() == torch.float16 and npu.supports_bf16() is False


def test_configure_backends_selects_npu_binary_kernels(monkeypatch):
    # Old: no configure_backends; the NPU compiled operators online (jit) instead of ModelZoo's binary kernels.
    calls = []
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(set_compile_mode=lambda **kw: calls.append(kw)),
                        raising=False)
    device_lib.configure_backends(NPU)
    assert calls == [{"jit_compile": False}]
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(), raising=False)  # an older torch_npu: no such call
    device_lib.configure_backends(NPU)


def test_gpu_checks_python_calls_what_this_repository_has():
    """test/gpu_check.sh runs only on a GPU machine, never in CI: its inline Python must still call functions
    that exist and parse flags main.py takes (a renamed config function once broke it unseen)."""
    import ast
    with open(os.path.join(REPO, "test", "gpu_check.sh")) as f:
        snippets = re.findall(r"\"\$PY\" -c '\n(.*?)\n'", f.read(), re.S)
    assert snippets
    for code in snippets:
        tree = ast.parse(code)
        ours = {alias.asname or alias.name: importlib.import_module(alias.name)
                for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
                if os.path.isfile(os.path.join(REPO, alias.name + ".py"))}
        assert ours, code
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ours:
                assert hasattr(ours[node.value.id], node.attr), f"gpu_check.sh calls {node.value.id}.{node.attr}"
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "parse_args" and node.args:
                main.get_args_parser().parse_args(ast.literal_eval(node.args[0]))  # SystemExit on a bad flag
