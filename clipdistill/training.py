"""The one distillation loop: any student, any loss, any image source, one process or many.

Each step the same augmented batch goes to the frozen teacher (logits against the stored class
vectors) and to the student; the loss compares the two logit sets. Nothing uses labels.

Under torchrun the student is wrapped in DistributedDataParallel and `batch_size` is the global
batch: every rank draws the same order and augmentations (same generator), takes its 1/N slice,
and DDP averages the gradients, so N processes take the steps one process would, except that
BatchNorm statistics are per rank on CPU (gloo); on CUDA BatchNorm layers become SyncBatchNorm.
"""
from __future__ import annotations

import math

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .augment import student_augment
from .runtime import Dist, PipelineError, autocast


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def distill(student: torch.nn.Module, teacher_logits, images: torch.Tensor, loss_fn, *, temperature: float,
            epochs: int, batch_size: int, lr: float, weight_decay: float, augment: bool, optimizer: str = "adamw",
            generator: torch.Generator, device: torch.device, log=None, student_step=None,
            amp_dtype: torch.dtype | None = None, dist: Dist = Dist()) -> list[float]:
    """Train `student` to match `teacher_logits(x) -> [B, C]` on uint8 `images` [N, 3, H, W].

    AdamW (or SGD with momentum 0.9, `optimizer="sgd"`, as CoOp, KDPL and PromptKD train prompts)
    with a cosine schedule and one warm-up epoch; only parameters with requires_grad train.
    `log(step, loss)` is called per epoch if given. `student_step(model, x, teacher_logits) ->
    (student logits, teacher logits)` replaces `model(x)` when the student decides which classes a
    step scores (KDPL-CA's top-K); `model` is the student, DDP-wrapped under torchrun. Forward
    passes run under autocast at `amp_dtype` (None: fp32); the loss is fp32. Returns per-step
    losses (averaged over ranks).
    """
    student.to(device).train()
    model = student
    if dist.world > 1:
        if batch_size % dist.world:
            raise PipelineError(f"distill.batch_size {batch_size} is not divisible by the {dist.world} processes")
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    per_rank = batch_size // dist.world
    mine = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
    params = [p for p in student.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r} (adamw | sgd)")
    n = images.shape[0]
    steps_per_epoch = max(1, n // batch_size)  # drop the last partial batch: BatchNorm needs > 1
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, steps_per_epoch))
    losses = []
    bar = tqdm(total=total, desc="distill", disable=None if dist.main else True)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        for b in range(steps_per_epoch):
            x = images[order[b * batch_size:(b + 1) * batch_size]].float().div(255)
            if augment:
                x = student_augment(x, generator)
            x = x[mine].to(device)
            with autocast(device, amp_dtype):
                with torch.no_grad():
                    t = teacher_logits(x)
                s, t = student_step(model, x, t) if student_step is not None else (model(x), t)
            loss = loss_fn(s.float(), t.float(), temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(_rank_mean(loss.detach(), dist))
            bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-steps_per_epoch:]) / steps_per_epoch:.4f}")
        if log is not None:
            log(epoch, sum(losses[-steps_per_epoch:]) / steps_per_epoch)
    bar.close()
    student.eval()
    return losses


def _rank_mean(value: torch.Tensor, dist: Dist) -> float:
    if dist.world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= dist.world
    return value.item()


@torch.no_grad()
def predict(model_logits, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Argmax predictions [N] of `model_logits(x) -> [B, C]` over uint8 images [N, 3, H, W]."""
    preds = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].float().div(255).to(device)
        preds.append(model_logits(x).argmax(-1).cpu())
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
