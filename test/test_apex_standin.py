"""The test-only apex stand-in (test/apex_standin/apex) against its contract, on a tiny conv+BN+linear net.

The stand-in mirrors Ascend's fork of apex (amp.initialize / scale_loss / master_params / state_dict and
apex.optimizers.NpuFusedSGD); see the docstrings under test/apex_standin/apex for the real source files. These
tests import it from its folder and remove it from sys.path/sys.modules afterwards, so other in-process tests
still see "apex is not installed".
"""
import importlib
import io
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "apex_standin")


@pytest.fixture(scope="module")
def apex():
    assert "apex" not in sys.modules, "a real or stand-in apex is already imported"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sys.path.insert(0, STANDIN)
    try:
        module = importlib.import_module("apex")
        assert getattr(module, "__standin__", False)
        yield module
    finally:
        sys.path.remove(STANDIN)
        for name in [n for n in sys.modules if n == "apex" or n.startswith("apex.")]:
            del sys.modules[name]
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def reset_amp(apex):
    yield
    apex.amp._standin_reset()  # initialize may patch torch.nn.Module.zero_grad process-wide, as the fork does


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 6, 6, generator=g), torch.tensor([0, 1, 2, 1])


def amp_step(apex, model, optimizer, x, y, inject_inf=False):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    with apex.amp.scale_loss(loss, optimizer) as scaled:
        scaled.backward()
        if inject_inf:
            model.conv.weight.grad.view(-1)[0] = float("inf")
    optimizer.step()
    return loss


def test_o2_casts_model_but_keeps_batchnorm_fp32_and_makes_fp32_masters(apex):
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = apex.amp.initialize(model, optimizer, opt_level="O2", verbosity=0)
    assert model.conv.weight.dtype == model.fc.weight.dtype == model.fc.bias.dtype == torch.float16
    for t in (model.bn.weight, model.bn.bias, model.bn.running_mean, model.bn.running_var):
        assert t.dtype == torch.float32
    out = model(batch()[0])  # fp32 input is cast to fp16 by the patched forward, the output back to fp32
    assert out.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())

    optimizer.zero_grad()  # first zero_grad (or scale_loss) creates the fp32 masters, as apex does lazily
    masters = list(apex.amp.master_params(optimizer))
    assert len(masters) == len(list(model.parameters()))
    assert all(p.dtype == torch.float32 for p in masters)
    model_ids = {id(p) for p in model.parameters()}
    fp16_params = [p for p in model.parameters() if p.dtype == torch.float16]
    assert sum(id(p) not in model_ids for p in masters) == len(fp16_params) == 3  # BN params are their own masters
    torch.testing.assert_close(masters[0], model.conv.weight.float())


def test_o2_zero_grad_takes_no_arguments(apex):
    model, optimizer = apex.amp.initialize(make_net(), torch.optim.SGD(make_net().parameters(), lr=0.1),
                                           opt_level="O2", verbosity=0)
    with pytest.raises(TypeError):
        optimizer.zero_grad(set_to_none=True)
    optimizer.zero_grad()


def test_o1_keeps_fp32_model_and_torch_zero_grad_unless_fused(apex):
    model = make_net()
    model, optimizer = apex.amp.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), opt_level="O1",
                                           verbosity=0)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    optimizer.zero_grad(set_to_none=True)  # plain optimizer at O1: its own zero_grad survives
    apex.amp._standin_reset()

    model = make_net()
    model, optimizer = apex.amp.initialize(model, apex.optimizers.NpuFusedSGD(model.parameters(), lr=0.1),
                                           opt_level="O1", verbosity=0)
    with pytest.raises(TypeError):
        optimizer.zero_grad(set_to_none=True)
    with pytest.raises(AssertionError, match="set_to_none"):
        model.zero_grad(set_to_none=True)  # the fork patches nn.Module.zero_grad under fused optimizers
    model.zero_grad()


@pytest.mark.parametrize("fused", [False, True], ids=["torch-SGD", "NpuFusedSGD"])
def test_o2_static_scale_step_matches_fp32_sgd(apex, fused):
    x, y = batch()
    reference = make_net()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    model = make_net()
    opt_cls = apex.optimizers.NpuFusedSGD if fused else torch.optim.SGD
    model, optimizer = apex.amp.initialize(model, opt_cls(model.parameters(), lr=0.5, momentum=0.9),
                                           opt_level="O2", loss_scale=128.0, verbosity=0)
    before = [p.detach().clone() for p in reference.parameters()]
    for _ in range(2):
        ref_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        ref_opt.step()
        amp_step(apex, model, optimizer, x, y)
    masters = list(apex.amp.master_params(optimizer))
    for b, ref, master in zip(before, reference.parameters(), masters):
        assert master.dtype == torch.float32
        torch.testing.assert_close(master - b, ref.detach() - b, rtol=2e-2, atol=2e-3)  # fp16 forward/backward
    torch.testing.assert_close(model.fc.weight, masters[-2].half())  # masters copied back into the fp16 model
    assert dict(apex.amp.state_dict()) == {"loss_scaler0": {"loss_scale": 128.0, "unskipped": 2}}


def test_npu_fused_sgd_is_torch_sgd_numerically(apex):
    x, y = batch()
    reference = make_net()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    model = make_net()
    optimizer = apex.optimizers.NpuFusedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2,
                                            nesterov=True)
    model, optimizer = apex.amp.initialize(model, optimizer, opt_level="O1", verbosity=0)  # fp32 in the stand-in
    for _ in range(3):
        ref_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        ref_opt.step()
        amp_step(apex, model, optimizer, x, y)  # dynamic scale 2**16: exact in fp32
    for ref, p in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(p, ref)


def test_dynamic_scale_skips_overflowing_step_and_halves(apex, capsys):
    x, y = batch()
    model = make_net()
    model, optimizer = apex.amp.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                           opt_level="O2", verbosity=1)
    capsys.readouterr()
    assert apex.amp.state_dict()["loss_scaler0"] == {"loss_scale": 2.**16, "unskipped": 0}
    before = [p.detach().clone() for p in model.parameters()]
    amp_step(apex, model, optimizer, x, y, inject_inf=True)
    assert "Gradient overflow.  Skipping step, loss scaler 0 reducing loss scale to 32768.0" in capsys.readouterr().out
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p)
    assert all(p.grad is None for p in optimizer._amp_stash.all_fp32_from_fp16_params)
    assert apex.amp.state_dict()["loss_scaler0"] == {"loss_scale": 2.**15, "unskipped": 0}

    amp_step(apex, model, optimizer, x, y)  # the skip is one-shot: the next clean step updates
    assert not torch.equal(before[0], model.conv.weight)
    assert apex.amp.state_dict()["loss_scaler0"] == {"loss_scale": 2.**15, "unskipped": 1}


def test_dynamic_scale_grows_after_clean_window_and_static_never_skips(apex):
    x, y = batch()
    model = make_net()
    model, optimizer = apex.amp.initialize(model, torch.optim.SGD(model.parameters(), lr=0.01), opt_level="O2",
                                           scale_window=2, verbosity=0)
    for _ in range(2):
        amp_step(apex, model, optimizer, x, y)
    assert apex.amp.state_dict()["loss_scaler0"] == {"loss_scale": 2.**17, "unskipped": 0}
    apex.amp._standin_reset()

    model = make_net()
    model, optimizer = apex.amp.initialize(model, torch.optim.SGD(model.parameters(), lr=0.01), opt_level="O2",
                                           loss_scale=8.0, verbosity=0)
    amp_step(apex, model, optimizer, x, y, inject_inf=True)  # static scale: no overflow check (as apex)
    assert not torch.isfinite(model.conv.weight).all()
    assert apex.amp.state_dict()["loss_scaler0"] == {"loss_scale": 8.0, "unskipped": 1}


def test_amp_state_dict_round_trip(apex):
    x, y = batch()
    model = make_net()
    model, optimizer = apex.amp.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), opt_level="O2",
                                           verbosity=0)
    amp_step(apex, model, optimizer, x, y, inject_inf=True)
    amp_step(apex, model, optimizer, x, y)
    buf = io.BytesIO()
    torch.save({"amp": apex.amp.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)["amp"]
    assert dict(saved) == {"loss_scaler0": {"loss_scale": 2.**15, "unskipped": 1}}

    apex.amp._standin_reset()
    fresh = make_net()
    fresh, fresh_opt = apex.amp.initialize(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), opt_level="O2",
                                           verbosity=0)
    apex.amp.load_state_dict(saved)
    assert apex.amp.state_dict() == saved
    with pytest.raises(RuntimeError, match="Unexpected key"):
        apex.amp.load_state_dict({"loss_scaler0": saved["loss_scaler0"], "bogus": {}})


@pytest.mark.parametrize("opt_level", ["O0", "O3"])
def test_npu_fused_sgd_refused_outside_o1_o2(apex, opt_level):
    model = make_net()
    with pytest.raises(RuntimeError, match=r"npu fused optimizer can only be used when opt_level='O1' or "
                                           r"opt_level='O2'"):
        apex.amp.initialize(model, apex.optimizers.NpuFusedSGD(model.parameters(), lr=0.1), opt_level=opt_level,
                            verbosity=0)


def test_npu_fused_sgd_other_refusals(apex):
    model = make_net()
    lone = apex.optimizers.NpuFusedSGD(model.parameters(), lr=0.1)
    model(batch()[0]).sum().backward()
    with pytest.raises(RuntimeError, match="should be used with AMP"):
        lone.step()
    with pytest.raises(RuntimeError, match="master_weights should be True"):
        apex.amp.initialize(make_net(), apex.optimizers.NpuFusedSGD(make_net().parameters(), lr=0.1),
                            opt_level="O2", master_weights=False, verbosity=0)
    with pytest.raises(RuntimeError, match="combine_grad=True"):
        apex.amp.initialize(make_net(), torch.optim.SGD(make_net().parameters(), lr=0.1), opt_level="O3",
                            combine_grad=True, verbosity=0)
    with pytest.raises(ValueError, match="Nesterov"):
        apex.optimizers.NpuFusedSGD(make_net().parameters(), lr=0.1, nesterov=True)


def test_return_shapes_and_disabled(apex):
    model = make_net()
    assert apex.amp.initialize(model, opt_level="O2", verbosity=0) is model  # no optimizer: the model alone
    apex.amp._standin_reset()
    model, opt = make_net(), torch.optim.SGD(make_net().parameters(), lr=0.1)
    assert apex.amp.initialize(model, opt, enabled=False) == (model, opt)
    loss = torch.tensor(2.0, requires_grad=True)
    with apex.amp.scale_loss(loss, opt) as scaled:
        assert scaled is loss
