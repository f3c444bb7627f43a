"""Learning-rate schedules, as LambdaLR factors of the step (0-based) out of `total` steps."""
from __future__ import annotations

import math

import torch


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Distillation: linear warm-up over `warmup` steps, then a cosine from 1 to 0 over the rest."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


PI_FLOAT32 = 3.14159265  # pi as the embedded CLIP schedule has always evaluated it, in float32


def clip_warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Embedded CLIP pre-training: a linear warm-up times one cosine over all `total` steps.

    The cosine is evaluated in float32 (torch), as the embedded teachers in every published
    figure were trained: float64 `math.cos` differs in the last bits at some steps and so
    changes the trained weights. Keep it bit for bit unless all figures are re-measured."""
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(step / total * PI_FLOAT32)).item())
