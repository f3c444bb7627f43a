"""Diversity of a feature set: the mean pairwise cosine distance within each class.

Used on the prompts' text features and on the synthesized images' teacher features, so the
effect of a prompt method on both sides can be read off one number per class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pairwise_cosine_distance(features: torch.Tensor, labels) -> dict[int, float]:
    """Per class c: mean over pairs i != j of class c of 1 - cos(f_i, f_j).

    features [N, D] (any norm; normalised here), labels [N] ints. A class with fewer than two
    members has no pairs and counts as 0 (no spread). Returns {class index: distance} for the
    classes present, in increasing class order.
    """
    feats = F.normalize(features.detach().double().cpu(), dim=-1)
    labels = torch.as_tensor(labels).cpu()
    out = {}
    for c in sorted(set(labels.tolist())):
        f = feats[labels == c]
        n = f.shape[0]
        if n < 2:
            out[c] = 0.0
            continue
        # sum_{i != j} cos = |sum_i f_i|^2 - n for unit f: O(nD), no n x n matrix.
        mean_cos = (f.sum(0).pow(2).sum() - n) / (n * (n - 1))
        out[c] = max(0.0, float(1 - mean_cos))  # rounding can dip below 0 for identical features
    return out


def diversity_report(features: torch.Tensor, labels, classes: list[str]) -> dict[str, float]:
    """{"mean": unweighted mean over classes, <class name>: distance, ...} for metrics files."""
    per_class = mean_pairwise_cosine_distance(features, labels)
    report = {"mean": sum(per_class.values()) / max(1, len(per_class))}
    report.update({classes[c]: d for c, d in per_class.items()})
    return report
