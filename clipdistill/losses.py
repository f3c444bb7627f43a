"""Distillation losses as pure functions of logits, chosen by name (`distill.loss`).

All take student and teacher logits [B, C]; the teacher side is detached, so no gradient ever
reaches the teacher.
"""
from __future__ import annotations

import functools

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


def promptkd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, *,
                  kd_weight: float) -> torch.Tensor:
    """PromptKD: kd_weight * T^2 * sum_{b,c} KL(softmax(t/T) || softmax(s/T)) / (B * C).

    Dividing the summed KL by B * C (not B) is PromptKD's `F.kl_div(..., reduction='sum') /
    numel`; the large weight (1000) compensates.
    """
    return kd_weight * kd_kl(student, teacher, temperature) / student.shape[1]


# `distill.loss`: name -> fn(student_logits, teacher_logits, temperature[, kd_weight])
LOSSES = {"kl": kd_kl, "reverse_kl": reverse_kl, "symmetric_kl": symmetric_kl, "promptkd": promptkd_loss}


def get_loss(name: str, kd_weight: float):
    """The loss `distill.loss` names, as fn(student_logits, teacher_logits, temperature);
    `kd_weight` (`distill.kd_weight`) is bound for the losses that take it (promptkd)."""
    if name == "promptkd":
        return functools.partial(promptkd_loss, kd_weight=kd_weight)
    return LOSSES[name]
