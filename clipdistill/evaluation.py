"""Scoring: per-domain accuracy of teacher and student, confusion data, size and speed."""
from __future__ import annotations

import time

import torch

from .image_sets import ImageSet
from .runtime import autocast
from .training import predict


def with_autocast(fn, device: torch.device, dtype: torch.dtype | None):
    """`fn` run under autocast at `dtype` (bf16 on CUDA by default), logits returned as fp32."""
    if dtype is None:
        return fn

    def run(x):
        with autocast(device, dtype):
            return fn(x).float()
    return run


def domain_accuracies(model_logits, domains: dict[str, ImageSet], batch_size: int, device: torch.device,
                      workers: int = 0) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """({domain: accuracy, ..., "mean": mean over domains}, {domain: predictions [N]}); each
    domain's labelled images streamed once."""
    acc, preds = {}, {}
    for name, images in domains.items():
        pred = predict(model_logits, images, batch_size, device, workers)
        preds[name] = pred
        acc[name] = round(float((pred == images.labels).float().mean()), 4)
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


def paired_images_per_second(fns: dict, image_size: int, device: torch.device, batch: int = 64, reps: int = 5,
                             rounds: int = 5) -> dict[str, float]:
    """{name: images/s} of each `fn`, the best of `rounds` timings of `reps` calls, the models taking
    turns round by round. A single timing on a shared CPU moves by 1.5x from run to run; taking
    turns makes a burst of load hit every model alike, and the best round is the least disturbed."""
    best = {name: 0.0 for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = max(best[name], images_per_second(fn, image_size, device, batch=batch, reps=reps))
    return best


@torch.no_grad()
def gflops_per_image(fn, image_size: int, device: torch.device) -> float:
    """GFLOPs (multiply-adds count 2) of `fn` on one [1, 3, S, S] image, from torch's FLOP counter
    (convolutions and matrix products; elementwise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, image_size, image_size, device=device)
    # nn.MultiheadAttention's fused inference path is invisible to the counter (a ViT-B/32 would
    # count 5.9 instead of 8.8 GFLOPs): count with it off.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter:
            fn(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() / 1e9


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def pooled_accuracy(model_logits, domains: dict[str, ImageSet], keep: list[int], batch_size: int,
                    device: torch.device, workers: int = 0) -> float:
    """Accuracy over every domain's images of the classes `keep`, predicting among `keep` only
    (the model scores exactly those classes, in that order)."""
    correct = total = 0
    remap = {c: i for i, c in enumerate(keep)}
    for images in domains.values():
        labels = images.labels
        mask = torch.tensor([int(y) in remap for y in labels.tolist()], dtype=torch.bool)
        if not mask.any():
            continue
        target = torch.tensor([remap[int(y)] for y in labels[mask].tolist()])
        pred = predict(model_logits, images.subset(mask.nonzero().squeeze(1)), batch_size, device, workers)
        correct += int((pred == target).sum())
        total += int(mask.sum())
    return correct / max(1, total)
