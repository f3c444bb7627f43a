"""The one distillation loop: any student, any loss, any image source, one process or many.

Each step the same augmented batch goes to the frozen teacher (logits against the stored class
vectors) and to the student; the loss compares the two logit sets. Nothing uses labels.

Under torchrun the student is wrapped in DistributedDataParallel and `batch_size` is the global
batch: every rank draws the same order and augmentations (same generator), takes its 1/N slice,
and DDP averages the gradients, so N processes take the steps one process would, except that
BatchNorm statistics are per rank on CPU (gloo); on CUDA BatchNorm layers become SyncBatchNorm.
"""
from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from .augment import student_augment
from .image_sets import EpochReader, ImageSet, as_image_set, batches as image_batches, sequential
from .losses import logits_of
from .resumable import Checkpoints, EpochOrder, TensorState, TrainableState, run_steps
from .runtime import Dist, PipelineError, autocast
from .schedules import cosine_lr


def _adamw(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _sgd(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with momentum 0.9: how CoOp, KDPL and PromptKD train prompts."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


OPTIMIZERS = {"adamw": _adamw, "sgd": _sgd}  # `distill.optimizer`


def distill(student: torch.nn.Module, teacher_logits, images: ImageSet | torch.Tensor, loss_fn, *, temperature: float,
            epochs: int, batch_size: int, lr: float, weight_decay: float, augment: bool, optimizer: str = "adamw",
            generator: torch.Generator, device: torch.device, student_step=None,
            amp_dtype: torch.dtype | None = None, dist: Dist = Dist(),
            checkpoints: Checkpoints | None = None, holdout: ImageSet | torch.Tensor | None = None,
            workers: int = 0) -> tuple[list[float], list[float]]:
    """Train `student` to match `teacher_logits(x) -> [B, C]` on `images` (uint8, in RAM or
    streamed: each epoch's batches are decoded ahead by `workers` DataLoader processes). For the
    feature losses the teacher and `student_step` give `losses.Outputs` (logits and image
    features) instead of logits; `loss_fn` receives whatever they give.

    AdamW (or SGD with momentum 0.9, `optimizer="sgd"`, as CoOp, KDPL and PromptKD train prompts)
    with a cosine schedule and one warm-up epoch; only parameters with requires_grad train.
    `student_step(model, x, teacher_logits) -> (student logits, teacher logits)` replaces
    `model(x)` when the student decides which classes a step scores (KDPL-CA's top-K); `model` is
    the student, DDP-wrapped under torchrun. Forward passes run under autocast at `amp_dtype`
    (None: fp32); the loss is fp32. `checkpoints` makes the run resumable (`resumable.run_steps`).
    Augmentation runs on the device, after the copy, drawn from `generator`.
    `holdout`: images kept out of `images`, on which the student's top class is compared
    with the teacher's after every epoch. Returns (per-step losses averaged over ranks, per-epoch
    agreement on `holdout`, empty without it); `epoch_losses` turns the losses into epoch means.
    """
    images = as_image_set(images)
    holdout = None if holdout is None else as_image_set(holdout)
    student.to(device).train()
    model = student
    if dist.processes > 1:
        if batch_size % dist.processes:
            raise PipelineError(f"distill.batch_size {batch_size} is not divisible by the {dist.processes} processes")
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    per_rank = batch_size // dist.processes
    rank_slice = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
    trainable = [param for param in student.parameters() if param.requires_grad]
    opt = OPTIMIZERS[optimizer](trainable, lr=lr, weight_decay=weight_decay)
    batches = EpochOrder(len(images), batch_size, generator)
    reader = EpochReader(images, batches, workers)
    total = epochs * batches.steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, batches.steps_per_epoch))

    def step(i: int) -> float:
        x = reader.batch(i)[1].to(device, non_blocking=True).float().div(255)
        if augment:
            x = student_augment(x, generator)
        x = x[rank_slice]
        with autocast(device, amp_dtype):
            with torch.no_grad():
                t = teacher_logits(x)
            s, t = student_step(model, x, t) if student_step is not None else (model(x), t)
        loss = loss_fn(s.float(), t.float(), temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return _rank_mean(loss.detach(), dist)

    agreement = TensorState(torch.full((epochs,), float("nan"), dtype=torch.float64))

    def after_step(i: int) -> None:
        if holdout is not None and (i + 1) % batches.steps_per_epoch == 0:
            agreement.tensor[(i + 1) // batches.steps_per_epoch - 1] = top1_agreement(
                student, teacher_logits, holdout, batch_size, device, amp_dtype, workers)

    state = {"student": TrainableState(student), "optimizer": opt, "scheduler": sched, "batches": batches,
             "agreement": agreement}
    losses = run_steps(step, total, state=state, generators=[generator], checkpoints=checkpoints, desc="distill",
                       progress=dist.main, after_step=after_step)
    student.eval()
    return losses, agreement.tensor.tolist() if holdout is not None else []


@torch.no_grad()
def top1_agreement(student, teacher_logits, images: ImageSet, batch_size: int, device: torch.device,
                   amp_dtype: torch.dtype | None = None, workers: int = 0) -> float:
    """Share of `images` on which the student's top class is the teacher's (eval mode for the
    measurement, then back to the mode it was in)."""
    images = as_image_set(images)
    was_training = student.training
    student.eval()
    same = 0
    for x in image_batches(images, sequential(len(images), batch_size), workers=workers, device=device):
        x = x.float().div(255)
        with autocast(device, amp_dtype):
            same += int((student(x).argmax(-1) == logits_of(teacher_logits(x)).argmax(-1)).sum())
    student.train(was_training)
    return same / max(1, len(images))


def epoch_losses(losses: list[float], epochs: int) -> list[float]:
    """Mean loss of each epoch from `distill`'s per-step losses."""
    per = len(losses) // epochs
    return [sum(losses[e * per:(e + 1) * per]) / per for e in range(epochs)]


def _rank_mean(value: torch.Tensor, dist: Dist) -> float:
    if dist.processes > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= dist.processes
    return value.item()


@torch.no_grad()
def predict(model_logits, images: ImageSet, batch_size: int, device: torch.device, workers: int = 0) -> torch.Tensor:
    """Argmax predictions [N] of `model_logits(x) -> [B, C]` over `images`, streamed in order."""
    images = as_image_set(images)
    preds = []
    for x in image_batches(images, sequential(len(images), batch_size), workers=workers, device=device):
        preds.append(model_logits(x.float().div(255)).argmax(-1).cpu())
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
