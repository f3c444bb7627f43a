import math

import pytest
import torch
from torch import nn

from clipdistill.synthesis import (clamp_with_grad, make_cutouts, random_codebook_latents, spherical_distance,
                                   synthesize_batch, vector_quantize)


def test_vector_quantize_returns_codebook_rows_and_straight_through(gen):
    codebook = torch.randn(16, 4, generator=gen)
    z = torch.randn(2, 3, 3, 4, generator=gen, requires_grad=True)
    zq = vector_quantize(z, codebook)
    rows = zq.detach().reshape(-1, 4)
    # every output vector is the nearest codebook row
    nearest = codebook[torch.cdist(z.detach().reshape(-1, 4), codebook).argmin(1)]
    assert torch.equal(rows, nearest)
    upstream = torch.randn_like(zq)
    zq.backward(upstream)
    assert torch.equal(z.grad, upstream)


def test_clamp_with_grad_forward_and_selective_backward():
    x = torch.tensor([-0.5, 0.5, 1.5, -0.5, 1.5], requires_grad=True)
    y = clamp_with_grad(x, 0.0, 1.0)
    assert torch.equal(y.detach(), torch.tensor([0.0, 0.5, 1.0, 0.0, 1.0]))
    # Gradients: descent moves x by -grad. Below range with grad>0 pushes further down: blocked.
    g = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0])
    y.backward(g)
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 0.0, -1.0, 1.0]))


def test_spherical_distance_limits(gen):
    a = torch.randn(5, 8, generator=gen)
    assert torch.allclose(spherical_distance(a, a), torch.zeros(5), atol=1e-6)
    # arcsin is steep at 1, so float32 rounding of |a - b| ~ 2 costs a few 1e-3 here
    assert torch.allclose(spherical_distance(a, -a), torch.full((5,), math.pi ** 2 / 2), atol=5e-3)
    assert torch.allclose(spherical_distance(a.double(), -a.double()), torch.full((5,), math.pi ** 2 / 2, dtype=torch.double), atol=1e-6)
    b = torch.randn(5, 8, generator=gen)
    cos = torch.nn.functional.cosine_similarity(a, b)
    # 2*arcsin(|a-b|/2) is the angle between unit vectors: distance = angle^2 / 2
    assert torch.allclose(spherical_distance(a, b), cos.clamp(-1, 1).arccos().pow(2) / 2, atol=1e-5)


@pytest.mark.parametrize("augment", [True, False])
def test_cutouts_shape_and_range(augment, gen):
    img = torch.rand(1, 3, 32, 32, generator=gen)
    cuts = make_cutouts(img, cutn=6, cut_size=24, cut_pow=1.0, min_cut=0.5, augment=augment, generator=gen)
    assert cuts.shape == (1, 6, 3, 24, 24)
    assert cuts.min() >= 0 and cuts.max() <= 1
    batch = make_cutouts(torch.rand(3, 3, 32, 32, generator=gen), cutn=4, cut_size=16, cut_pow=1.0, min_cut=0.5,
                          augment=True, generator=gen)
    assert batch.shape == (3, 4, 3, 16, 16)


def test_full_size_cutout_without_augment_is_the_image(gen):
    img = torch.rand(2, 3, 16, 16, generator=gen)
    cuts = make_cutouts(img, cutn=2, cut_size=16, cut_pow=1.0, min_cut=1.0, augment=False, generator=gen)
    assert torch.allclose(cuts[:, 0], img, atol=1e-5)


class TinyVQ(nn.Module):
    """A stand-in decoder with the VQGAN interface: codebook [K, D], decode [B,D,h,w] -> [B,3,2h,2w]."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.codebook = torch.randn(32, 4, generator=g)
        self.conv = nn.ConvTranspose2d(4, 3, 2, 2)

    def decode(self, z):
        return torch.tanh(self.conv(z))


class TinyTeacher(nn.Module):
    image_size = 8

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 6))

    def encode_image(self, x):
        return torch.nn.functional.normalize(self.net(x), dim=-1)


def test_synthesis_keeps_z_in_codebook_range_and_lowers_distance(gen):
    torch.manual_seed(0)
    vq, teacher = TinyVQ().requires_grad_(False), TinyTeacher().requires_grad_(False)
    targets = torch.nn.functional.normalize(torch.randn(3, 6, generator=gen), dim=-1)
    inits = [torch.Generator().manual_seed(i) for i in range(3)]
    z0 = random_codebook_latents(vq.codebook, 3, 4, 4, inits)
    # initial latents are codebook rows
    assert all((vq.codebook == v).all(1).any() for v in z0.permute(0, 2, 3, 1).reshape(-1, 4))

    def dist(x):
        return spherical_distance(teacher.encode_image(x), targets).mean().item()

    from clipdistill.synthesis import decode_latents
    before = dist(decode_latents(vq, z0))
    inits = [torch.Generator().manual_seed(i) for i in range(3)]
    x = synthesize_batch(vq, teacher, targets, steps=30, lr=0.1, cutn=4, cut_pow=1.0, min_cut=0.8,
                         augment=False, latent_hw=(4, 4), init_generators=inits, generator=gen)
    assert x.shape == (3, 3, 8, 8) and x.min() >= 0 and x.max() <= 1
    assert dist(x) < before


def test_z_clamped_each_step(monkeypatch, gen):
    """After every Adam step z lies within the codebook's per-channel range."""
    vq, teacher = TinyVQ().requires_grad_(False), TinyTeacher().requires_grad_(False)
    lo, hi = vq.codebook.min(0).values, vq.codebook.max(0).values
    seen = []
    real_step = torch.optim.Adam.step

    def spy(self, *a, **k):
        out = real_step(self, *a, **k)
        seen.append(self.param_groups[0]["params"][0])
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    targets = torch.nn.functional.normalize(torch.randn(2, 6, generator=gen), dim=-1)
    inits = [torch.Generator().manual_seed(i) for i in range(2)]
    synthesize_batch(vq, teacher, targets, steps=3, lr=5.0, cutn=2, cut_pow=1.0, min_cut=0.5,
                     augment=True, latent_hw=(4, 4), init_generators=inits, generator=gen)
    z = seen[-1].detach()
    assert (z >= lo.view(1, -1, 1, 1) - 1e-6).all() and (z <= hi.view(1, -1, 1, 1) + 1e-6).all()
