"""Batch augmentations on [B, 3, H, W] images in [0, 1], every draw from an explicit generator."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def flip_translate(x: torch.Tensor, generator: torch.Generator, max_shift: int = 4) -> torch.Tensor:
    """Random horizontal flip + translation by up to `max_shift` px (reflect padding)."""
    b, _, h, w = x.shape
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    if max_shift > 0:
        pad = F.pad(x, [max_shift] * 4, mode="reflect")
        dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator).tolist()
        dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator).tolist()
        x = torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    return x


def color_gray(x: torch.Tensor, generator: torch.Generator, p_gray: float = 0.2,
               strength: float = 0.3) -> torch.Tensor:
    """Brightness/contrast/saturation jitter and random grayscale (SimCLR-style, milder)."""
    b = x.shape[0]

    def u(lo, hi):
        return (torch.rand(b, 1, 1, 1, generator=generator) * (hi - lo) + lo).to(x.device)

    gray = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = x * u(1 - strength, 1 + strength)                                   # brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(1 - strength, 1 + strength) + mean                   # contrast
    x = (x - gray) * u(1 - strength, 1 + strength) + gray                   # saturation
    to_gray = (torch.rand(b, generator=generator) < p_gray).to(x.device).view(b, 1, 1, 1)
    x = torch.where(to_gray, gray.expand_as(x), x)
    return x.clamp(0, 1)


def student_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What distillation applies to each batch (teacher and student see the same image)."""
    return color_gray(flip_translate(x, generator, max_shift=max(1, x.shape[-1] // 8)), generator)
