"""VQGAN-CLIP synthesis (Xuan et al.; docs/design.md), batched over many prompts per step.

The primitives are pure functions of tensors (tested against hand formulas); `synthesize_batch`
optimises one latent per prompt, all prompts of a batch in the same forward/backward pass, which
is what makes it many times faster than the reference one-image loop.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F

from .formats import Format, Probe
from .runtime import autocast


def vector_quantize(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest codebook row forward, straight-through gradient backward.

    z: [..., D] (channels last); codebook: [K, D]. Returns [..., D] whose values are codebook rows
    and whose gradient w.r.t. z is the identity.
    """
    return _StraightThrough.apply(z, codebook)


class _StraightThrough(torch.autograd.Function):
    # `z + (zq - z).detach()` would be off a codebook row by float rounding; this is exact.
    @staticmethod
    def forward(ctx, z, codebook):
        flat = z.reshape(-1, z.shape[-1])
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None]
        return codebook[d.argmin(1)].view_as(z)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ClampWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lo, hi):
        ctx.lo, ctx.hi = lo, hi
        ctx.save_for_backward(x)
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        # Zero the gradient only where a descent step (x - lr * grad) would go further out of range;
        # elsewhere it flows, so saturated pixels can still come back into range.
        outward = ((x < ctx.lo) & (grad > 0)) | ((x > ctx.hi) & (grad < 0))
        return grad.masked_fill(outward, 0), None, None


def clamp_with_grad(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Clamp forward; backward passes the gradient except where it would push further out of range."""
    return _ClampWithGrad.apply(x, lo, hi)


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared great-circle distance between directions: 2 * arcsin(|n(a) - n(b)| / 2)^2.

    a, b: [..., D] (broadcast); returns [...]. 0 for equal directions, pi^2 / 2 for opposite ones.
    """
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return (a - b).norm(dim=-1).div(2).clamp(max=1).arcsin().pow(2).mul(2)


def make_cutouts(images: torch.Tensor, cutn: int, cut_size: int, *, cut_pow: float, min_cut: float, augment: bool,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Random square crops of every image, resized to the teacher's input size.

    images: [B, 3, H, W] in [0, 1] -> [B, cutn, 3, cut_size, cut_size] in [0, 1]. Crop side =
    rand**cut_pow * (max - min) + min with max = min(H, W) and min = min_cut * max (the
    reference formula). Crops are one affine `grid_sample`, so all B*cutn crops cost one call;
    with `augment`, each crop also gets a random flip, a rotation of up to 15 degrees and
    Gaussian noise of random strength up to 0.1 (the reference implementations' augmentations).
    """
    b, _, h, w = images.shape
    n = b * cutn
    dev = images.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator).to(dev)

    side = min(h, w)
    size = rand(n).pow(cut_pow) * (1 - min_cut) * side + min_cut * side  # pixels
    # Offsets keep the crop inside the image; in grid_sample's [-1, 1] coordinates.
    sx, sy = size / w, size / h
    cx = (rand(n) * 2 - 1) * (1 - sx)
    cy = (rand(n) * 2 - 1) * (1 - sy)
    angle = (rand(n) * 2 - 1) * math.radians(15) if augment else torch.zeros(n, device=dev)
    flip = torch.where(rand(n) < 0.5, -1.0, 1.0) if augment else torch.ones(n, device=dev)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([
        torch.stack([sx * cos * flip, -sx * sin, cx], dim=1),
        torch.stack([sy * sin * flip, sy * cos, cy], dim=1),
    ], dim=1)  # [n, 2, 3]
    grid = F.affine_grid(theta, [n, 3, cut_size, cut_size], align_corners=False)
    src = images.repeat_interleave(cutn, dim=0)
    cuts = F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if augment:
        fac = rand(n, 1, 1, 1) * 0.1
        noise = torch.randn(cuts.shape, generator=generator).to(dev)
        cuts = (cuts + fac * noise).clamp(0, 1)
    return cuts.view(b, cutn, 3, cut_size, cut_size)


def random_codebook_latents(codebook: torch.Tensor, batch: int, height: int, width: int,
                            generators: list[torch.Generator]) -> torch.Tensor:
    """z = one_hot(randint) @ codebook, one generator per image: [B, D, h, w]."""
    k = codebook.shape[0]
    idx = torch.stack([torch.randint(k, (height, width), generator=g) for g in generators[:batch]])
    one_hot = F.one_hot(idx.to(codebook.device), k).to(codebook.dtype)
    return (one_hot @ codebook).permute(0, 3, 1, 2).contiguous()


def decode_latents(vqgan, z: torch.Tensor) -> torch.Tensor:
    """[B, D, h, w] latents -> quantised, decoded images in [0, 1] ([B, 3, H, W]), gradient kept."""
    zq = vector_quantize(z.permute(0, 2, 3, 1), vqgan.codebook).permute(0, 3, 1, 2)
    return clamp_with_grad((vqgan.decode(zq) + 1) / 2, 0, 1)


def synthesize_batch(vqgan, teacher, targets: torch.Tensor, *, steps: int, lr: float, cutn: int,
                     cut_pow: float, min_cut: float, augment: bool, latent_hw: tuple[int, int],
                     init_generators: list[torch.Generator], generator: torch.Generator,
                     amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Optimise one VQGAN latent per target text feature so the teacher sees that text.

    targets: unit-norm [B, D] text features. Each step decodes all B latents, takes `cutn`
    cutouts per image, and minimises the mean spherical distance between the cutouts' teacher
    features and each image's own target; Adam on z, then z is clamped to the codebook's
    per-channel range. With `amp_dtype` (bf16 on CUDA) decoding and the teacher run under
    autocast; the latents, Adam and the loss stay fp32. Returns images [B, 3, H, W] in [0, 1]
    (detached, fp32).
    """
    codebook = vqgan.codebook.detach()
    b = targets.shape[0]
    z = random_codebook_latents(codebook, b, *latent_hw, init_generators).requires_grad_(True)
    z_min = codebook.min(0).values.view(1, -1, 1, 1)
    z_max = codebook.max(0).values.view(1, -1, 1, 1)
    opt = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        with autocast(z.device, amp_dtype):
            x = decode_latents(vqgan, z)
            cuts = make_cutouts(x, cutn, teacher.image_size, cut_pow=cut_pow, min_cut=min_cut,
                                augment=augment, generator=generator)
            feats = teacher.encode_image(cuts.flatten(0, 1)).view(b, cutn, -1)
        # Sum over images (each latent only sees its own term), mean over cutouts.
        loss = spherical_distance(feats.float(), targets[:, None]).mean(1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            z.copy_(torch.maximum(torch.minimum(z, z_max), z_min))
    with torch.no_grad(), autocast(z.device, amp_dtype):
        return decode_latents(vqgan, z).detach().float()


def synthesis_probe(vqgan, teacher, targets: torch.Tensor, **optimise) -> Probe:
    """`formats` probe: one `synthesize_batch` step on `targets`, with copies of both models in the
    format's memory format. `optimise`: synthesize_batch's keywords but steps, generators and amp_dtype."""
    def prepare(fmt: Format) -> Callable[[], None]:
        models = [fmt.apply(copy.deepcopy(m)) for m in (vqgan, teacher)]

        def run() -> None:
            gens = [torch.Generator().manual_seed(i) for i in range(len(targets))]
            synthesize_batch(*models, targets, steps=1, init_generators=gens, generator=torch.Generator().manual_seed(0),
                             amp_dtype=fmt.amp_dtype, **optimise)
        return run
    return prepare


def image_seed(seed: int, prompt_id: int) -> int:
    """Each image's latent init depends only on (seed, prompt id), not on batching or ranks."""
    return seed * 1_000_003 + prompt_id


def synthesize_shard(vqgan, teacher, targets: torch.Tensor, class_vectors: torch.Tensor, labels: torch.Tensor,
                     start: int, end: int, *, seed: int, batch_size: int, latent_hw: tuple[int, int],
                     progress=None, **optimise) -> dict:
    """Images for prompts start..end-1 (one shard), in batches of `batch_size` prompts.

    targets [N, D] (all prompts' text features) and labels [N] (their class index) on the
    device; class_vectors [C, D] score the teacher's confidence in each image's class.
    `optimise`: synthesize_batch's steps, lr, cutn, cut_pow, min_cut, augment, amp_dtype.
    Every latent init and every batch's cutout draws depend only on `seed` and the prompt ids,
    so any split of the shards over processes writes the same images. Returns the shard's
    columns: uint8 images [n, 3, H, W], prompt_ids, seeds, confidence (CPU tensors).
    """
    images, confidence = [], []
    for b0 in range(start, end, batch_size):
        ids = list(range(b0, min(b0 + batch_size, end)))
        inits = [torch.Generator().manual_seed(image_seed(seed, j)) for j in ids]
        step_gen = torch.Generator().manual_seed(image_seed(seed, b0) ^ 0x5EED)
        x = synthesize_batch(vqgan, teacher, targets[ids], latent_hw=latent_hw, init_generators=inits,
                             generator=step_gen, **optimise)
        with torch.no_grad():
            probs = teacher.logits(x, class_vectors).softmax(-1)
        confidence.append(probs.gather(1, labels[ids][:, None]).squeeze(1).cpu())
        images.append(x.mul(255).round().to(torch.uint8).cpu())
        if progress is not None:
            progress.update(len(ids))
    return {"images": torch.cat(images), "prompt_ids": torch.arange(start, end),
            "seeds": torch.tensor([image_seed(seed, j) for j in range(start, end)]),
            "confidence": torch.cat(confidence)}
