"""Distillation losses as pure functions of logits, chosen by name (`distill.loss`).

All take student and teacher logits [B, C]; the teacher side is detached, so no gradient ever
reaches the teacher.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton KD: T^2 * KL(softmax(t/T) || softmax(s/T)), mean over the batch."""
    t = temperature
    log_p_s = F.log_softmax(student / t, dim=-1)
    log_p_t = F.log_softmax(teacher.detach() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return kl.mean() * t * t


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(s/T) || softmax(t/T)), mean over the batch (mode-seeking)."""
    t = temperature
    log_p_s = F.log_softmax(student / t, dim=-1)
    log_p_t = F.log_softmax(teacher.detach() / t, dim=-1)
    kl = (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    return kl.mean() * t * t


def symmetric_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KDPL's loss: 0.5 * KL(p_t || p_s) + 0.5 * KL(p_s || p_t); the paper uses T = 1."""
    return 0.5 * kd_kl(student, teacher, temperature) + 0.5 * reverse_kl(student, teacher, temperature)


LOSSES = {"kl": kd_kl, "reverse_kl": reverse_kl, "symmetric_kl": symmetric_kl}


def get_loss(name: str):
    if name not in LOSSES:
        raise ValueError(f"unknown distill.loss '{name}'; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]
