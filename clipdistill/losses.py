"""Distillation losses as pure functions, chosen by name (`distill.loss`).

The logit losses take student and teacher logits [B, C]. The feature losses take `Outputs`
(logits and image features [B, D]) of both: the student's projection into the teacher's embedding
space against the teacher's image feature (Popp et al. 2024, arXiv 2404.16637, found an L2 loss
on image features transfers from synthetic to real images better than logit or contrastive
losses), optionally plus a weighted KL on the logits. The teacher side is always detached, so no
gradient ever reaches the teacher.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Outputs(NamedTuple):
    """What a feature loss compares: logits [B, C] and image features [B, D] in the teacher's space."""

    logits: torch.Tensor
    features: torch.Tensor

    def float(self) -> "Outputs":
        return Outputs(self.logits.float(), self.features.float())


def logits_of(out: "torch.Tensor | Outputs") -> torch.Tensor:
    return out.logits if isinstance(out, Outputs) else out


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


def feature_l2(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """sum_d (s - t)^2, mean over the batch: the student's projection [B, D] as it comes out (not
    re-normalised) against the teacher's unit-norm image feature, so it learns the direction and
    the unit norm (Popp et al.'s L2 feature distillation)."""
    return (student - teacher.detach()).square().sum(-1).mean()


def feature_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cos(s, t), mean over the batch: the direction only, which is all the cosine classifier
    reads."""
    return (1 - F.cosine_similarity(student, teacher.detach(), dim=-1)).mean()


def feature_loss(student: Outputs, teacher: Outputs, temperature: float, *, distance, kl_weight: float) -> torch.Tensor:
    """distance(student features, teacher features) + kl_weight * T^2 KL(teacher || student) on the logits."""
    loss = distance(student.features, teacher.features)
    if kl_weight:
        loss = loss + kl_weight * kd_kl(student.logits, teacher.logits, temperature)
    return loss


FEATURE_DISTANCES = {"feature_l2": feature_l2, "feature_cosine": feature_cosine}

# `distill.loss`: name -> fn(student, teacher, temperature[, kd_weight | distance, kl_weight])
LOSSES = {"kl": kd_kl, "reverse_kl": reverse_kl, "symmetric_kl": symmetric_kl, "promptkd": promptkd_loss,
          **{name: feature_loss for name in FEATURE_DISTANCES}}


def needs_features(name: str) -> bool:
    """Whether `distill.loss` compares image features (student and teacher give `Outputs`)."""
    return name in FEATURE_DISTANCES


def get_loss(name: str, kd_weight: float, kl_weight: float = 0.0):
    """The loss `distill.loss` names, as fn(student, teacher, temperature): logits for the logit
    losses, `Outputs` for the feature losses. `kd_weight` (`distill.kd_weight`) is bound for
    promptkd, `kl_weight` (`distill.feature_kl_weight`) for the feature losses."""
    if name == "promptkd":
        return functools.partial(promptkd_loss, kd_weight=kd_weight)
    if needs_features(name):
        return functools.partial(feature_loss, distance=FEATURE_DISTANCES[name], kl_weight=kl_weight)
    return LOSSES[name]
