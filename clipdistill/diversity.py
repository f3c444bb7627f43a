"""Diversity of a feature set: the mean pairwise cosine distance within each class.

Used on the prompts' text features and on the synthesized images' teacher features, so the
effect of a prompt method on both sides can be read off one number per class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ClassSums:
    """Per class, the sum of unit features and their count: all the mean pairwise cosine distance
    needs, accumulated a batch at a time (the synthesized set's features are never held at once)."""

    def __init__(self):
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def add(self, features: torch.Tensor, labels) -> "ClassSums":
        feats = F.normalize(features.detach().double().cpu(), dim=-1)
        labels = torch.as_tensor(labels).cpu()
        for c in sorted(set(labels.tolist())):
            f = feats[labels == c]
            self.sums[c] = self.sums[c] + f.sum(0) if c in self.sums else f.sum(0)
            self.counts[c] = self.counts.get(c, 0) + f.shape[0]
        return self

    def distances(self) -> dict[int, float]:
        """{class index: mean over pairs i != j of 1 - cos(f_i, f_j)}, increasing class order. A
        class with fewer than two members has no pairs and counts as 0 (no spread)."""
        out = {}
        for c in sorted(self.sums):
            n = self.counts[c]
            if n < 2:
                out[c] = 0.0
                continue
            # sum_{i != j} cos = |sum_i f_i|^2 - n for unit f: O(nD), no n x n matrix.
            mean_cos = (self.sums[c].pow(2).sum() - n) / (n * (n - 1))
            out[c] = max(0.0, float(1 - mean_cos))  # rounding can dip below 0 for identical features
        return out


def mean_pairwise_cosine_distance(features: torch.Tensor, labels) -> dict[int, float]:
    """Per class c: mean over pairs i != j of class c of 1 - cos(f_i, f_j).

    features [N, D] (any norm; normalised here), labels [N] ints. Returns {class index: distance}
    for the classes present, in increasing class order (`ClassSums.distances`).
    """
    return ClassSums().add(features, labels).distances()


def diversity_report(features: torch.Tensor | ClassSums, labels, classes: list[str]) -> dict[str, float]:
    """{"mean": unweighted mean over classes, <class name>: distance, ...} for metrics files, from
    features [N, D] and their labels, or from accumulated `ClassSums` (labels None)."""
    sums = features if isinstance(features, ClassSums) else ClassSums().add(features, labels)
    per_class = sums.distances()
    report = {"mean": sum(per_class.values()) / max(1, len(per_class))}
    report.update({classes[c]: d for c, d in per_class.items()})
    return report
