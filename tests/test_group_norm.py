"""The channels-last CPU GroupNorm computes F.group_norm's function and gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.group_norm import GroupNorm, fast_group_norm
from clipdistill.vqgan import VQGAN, VQGANConfig


@pytest.fixture(autouse=True)
def every_size(monkeypatch):
    """The fast path at any size (it is skipped below MIN_ELEMENTS, where it would not pay)."""
    monkeypatch.setattr("clipdistill.group_norm.MIN_ELEMENTS", 0)


def _inputs(n, c, h, w, offset):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(n, c, h, w, generator=gen) * 2 + offset).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    dy = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    return x, weight, bias, dy


@pytest.mark.parametrize("groups,channels,side,offset", [
    (32, 32, 8, 0.0),     # one channel per group, as the embedded VQGAN's
    (32, 64, 16, 0.0),    # two channels per group
    (4, 32, 5, 0.0),      # eight channels per group, an odd side
    (32, 32, 8, 300.0),   # a large mean: the variance must not cancel
])
def test_matches_torch_group_norm_values_and_gradients(groups, channels, side, offset):
    """Against torch's GroupNorm in float64: at the large offset a one-pass variance would cancel
    (torch's own channels-last fp32 kernel does), the two-pass moments here must not."""
    x, weight, bias, dy = _inputs(3, channels, side, side, offset)
    ours = GroupNorm(groups, channels, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(weight)
        ours.bias.copy_(bias)
    xa = x.clone().requires_grad_(True)
    xb = x.double().requires_grad_(True)
    wb, bb = weight.double().requires_grad_(True), bias.double().requires_grad_(True)
    ya = ours(xa)
    yb = F.group_norm(xb, groups, wb, bb, 1e-6)
    ga = torch.autograd.grad(ya, (xa, ours.weight, ours.bias), dy)
    gb = torch.autograd.grad(yb, (xb, wb, bb), dy.double())
    assert ya.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ya.double(), yb, rtol=1e-4, atol=1e-4)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_other_inputs_take_torch_kernel(monkeypatch):
    """NCHW input (and anything not channels-last fp32 on the CPU) runs nn.GroupNorm's own forward."""
    calls = []
    monkeypatch.setattr("clipdistill.group_norm._GroupNormFunction.apply",
                        lambda *a: calls.append(a) or F.group_norm(a[0], a[3], a[1], a[2], a[4]))
    norm = GroupNorm(4, 8)
    norm(torch.randn(2, 8, 4, 4))
    norm.double()(torch.randn(2, 8, 4, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last))
    norm.float()
    assert calls == []
    norm(torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last))
    assert len(calls) == 1
    monkeypatch.setattr("clipdistill.group_norm.MIN_ELEMENTS", 2 * 8 * 4 * 4 + 1)
    norm(torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last))
    assert len(calls) == 1  # too small to pay


def test_vqgan_uses_it_with_taming_keys():
    vqgan = VQGAN(VQGANConfig(ch_mult=(1, 1), num_res_blocks=0))
    norms = [m for m in vqgan.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(type(m) is GroupNorm for m in norms)
    keys = set(vqgan.state_dict())
    assert "decoder.norm_out.weight" in keys and "decoder.norm_out.bias" in keys
    plain = nn.Sequential(nn.GroupNorm(2, 4))
    assert type(fast_group_norm(plain)[0]) is GroupNorm


def test_channels_last_decode_matches_nchw():
    torch.manual_seed(0)
    vqgan = VQGAN(VQGANConfig(ch_mult=(1, 1), num_res_blocks=0)).eval()
    z = torch.randn(2, vqgan.cfg.embed_dim, 8, 8)
    nchw = vqgan.decode(z)
    vqgan.to(memory_format=torch.channels_last)
    cl = vqgan.decode(z.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, nchw, rtol=1e-4, atol=1e-4)
