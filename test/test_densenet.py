"""Tests for densenet.py: torchvision compatibility (names, shapes, outputs),
legacy checkpoint keys, memory-efficient checkpointing, and small behaviours."""

import os
import re
import sys
from collections import OrderedDict

import pytest
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import densenet  # noqa: E402
from densenet import DenseNet, build_model, convert_legacy_keys  # noqa: E402

BUILDERS = ["densenet121", "densenet161", "densenet169", "densenet201"]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def tiny(**kwargs):
    return DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=5, **kwargs)


def to_legacy(state_dict):
    # written independently of densenet.convert_legacy_keys: turn the modern
    # '...denselayerN.norm1.weight' into the old '...denselayerN.norm.1.weight'
    out = OrderedDict()
    for k, v in state_dict.items():
        out[re.sub(r"(denselayer\d+\.)(norm|relu|conv)([12])\.", r"\1\2.\3.", k)] = v
    return out


def assert_same_state(sd_a, sd_b):
    assert list(sd_a.keys()) == list(sd_b.keys())
    for k in sd_a:
        assert sd_a[k].shape == sd_b[k].shape, k
        assert sd_a[k].dtype == sd_b[k].dtype, k


@pytest.mark.parametrize("name", BUILDERS)
def test_matches_torchvision(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)(weights=None)
    ours = getattr(densenet, name)()
    assert_same_state(tv.state_dict(), ours.state_dict())
    ours.load_state_dict(tv.state_dict(), strict=True)
    assert_same_state(tv.state_dict(), ours.state_dict())

    # same parameter count (also catches anything outside the state_dict)
    assert sum(p.numel() for p in tv.parameters()) == sum(p.numel() for p in ours.parameters())

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tv.eval(), ours.eval()
        torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=0)
        # train mode: BN normalizes with batch stats and updates running stats
        tv.train(), ours.train()
        torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=0)
    for k, v in tv.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=0, atol=0)


def test_ours_loads_into_torchvision():
    torch.manual_seed(0)
    ours = densenet.densenet121(num_classes=10)
    tv = torchvision.models.densenet121(weights=None, num_classes=10)
    tv.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(), tv.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tv(x), ours(x), rtol=0, atol=0)


def test_legacy_keys_load():
    torch.manual_seed(0)
    src = densenet.densenet121(num_classes=7).eval()
    legacy = to_legacy(src.state_dict())
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    assert "features.denseblock4.denselayer16.conv.2.weight" in legacy
    assert not any(re.search(r"denselayer\d+\.(norm|conv)[12]\.", k) for k in legacy)

    dst = densenet.densenet121(num_classes=7).eval()
    dst.load_state_dict(legacy, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)

    # the published .pth files predate BN's num_batches_tracked buffer (and carry
    # no version metadata); BatchNorm fills it in, so they still load strictly
    oldest = OrderedDict((k, v) for k, v in legacy.items() if not k.endswith("num_batches_tracked"))
    densenet.densenet121(num_classes=7).load_state_dict(oldest, strict=True)

    # the conversion itself: legacy -> modern names in the original order,
    # modern dicts pass through untouched, input is not mutated
    modern = src.state_dict()
    converted = convert_legacy_keys(legacy)
    assert list(converted.keys()) == list(modern.keys())
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    unchanged = convert_legacy_keys(modern)
    assert list(unchanged.keys()) == list(modern.keys())
    assert all(unchanged[k] is modern[k] for k in modern)


def test_memory_efficient_matches():
    torch.manual_seed(0)
    ref = tiny()
    eff = tiny(memory_efficient=True)
    eff.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):  # two steps so accumulated grads and running stats are compared too
        out_ref, out_eff = ref(x), eff(x)
        torch.testing.assert_close(out_eff, out_ref, rtol=0, atol=0)
        (out_ref ** 2).sum().backward()
        (out_eff ** 2).sum().backward()
        for (n, p_ref), p_eff in zip(ref.named_parameters(), eff.parameters()):
            torch.testing.assert_close(p_eff.grad, p_ref.grad, rtol=0, atol=0, msg=n)
        # the checkpoint recompute must not update BN running stats a second time
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(eff.state_dict()[k], v, rtol=0, atol=0, msg=k)

    # input gradient too (checkpoint sees inputs that require grad)
    xr = x.clone().requires_grad_()
    xe = x.clone().requires_grad_()
    ref(xr).sum().backward()
    eff(xe).sum().backward()
    torch.testing.assert_close(xe.grad, xr.grad, rtol=0, atol=0)

    # and no_grad inference takes the plain path with identical results
    ref.eval(), eff.eval()
    with torch.no_grad():
        torch.testing.assert_close(eff(x), ref(x), rtol=0, atol=0)


def test_num_classes():
    for n in (3, 1000):
        m = DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=n)
        assert m.classifier.weight.shape == (n, 32)  # (16 + 2*8) // 2 + 2*8
        assert m.classifier.bias.shape == (n,)
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, n)
    assert build_model("densenet201", num_classes=11).classifier.weight.shape == (11, 1920)


def test_channels_last():
    torch.manual_seed(0)
    m = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        m = m.to(memory_format=torch.channels_last)
        out = m(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # and backward works in channels_last (train mode)
    m.train()
    m(x.to(memory_format=torch.channels_last)).sum().backward()


def test_build_model():
    assert set(densenet.MODELS) == set(BUILDERS)
    m = build_model("densenet121", num_classes=4, drop_rate=0.1, memory_efficient=True)
    assert isinstance(m, DenseNet) and m.classifier.out_features == 4
    layer = m.features.denseblock1.denselayer1
    assert layer.drop_rate == 0.1 and layer.memory_efficient
    with pytest.raises(ValueError, match="unknown model 'nope'; choose from"):
        build_model("nope")


def test_drop_rate():
    torch.manual_seed(0)
    plain = tiny()
    drop = tiny(drop_rate=0.5)
    drop.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    plain.eval(), drop.eval()
    with torch.no_grad():
        torch.testing.assert_close(drop(x), plain(x), rtol=0, atol=0)
        plain.train(), drop.train()
        assert not torch.allclose(drop(x), plain(x))
