"""Scoring: per-domain accuracy of teacher and student, confusion data, size and speed."""
from __future__ import annotations

import time

import torch

from .training import predict


def domain_accuracies(model_logits, domains: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int,
                      device: torch.device) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """({domain: accuracy, ..., "mean": mean over domains}, {domain: predictions [N]})."""
    acc, preds = {}, {}
    for name, (images, labels) in domains.items():
        pred = predict(model_logits, images, batch_size, device)
        preds[name] = pred
        acc[name] = round(float((pred == labels).float().mean()), 4)
    acc["mean"] = round(sum(acc[d] for d in domains) / len(domains), 4)
    return acc, preds


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def images_per_second(fn, image_size: int, device: torch.device, batch: int = 64, reps: int = 5) -> float:
    """Throughput of `fn([batch, 3, S, S] in [0, 1])` after one warm-up call."""
    x = torch.rand(batch, 3, image_size, image_size, device=device)
    fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * reps / (time.perf_counter() - start)
