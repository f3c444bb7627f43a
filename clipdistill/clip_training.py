"""Training the embedded CLIPs (clip, student_clip) on the world's captioned train split.

Image-caption contrastive learning with every identical-caption pair a positive; the loop is
`resumable.run_steps`, as every training loop in the project.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .augment import flip_translate
from .clip_models import ClipModel
from .image_sets import EpochReader, ImageSet, as_image_set
from .formats import Probe, step_probe
from .resumable import Checkpoints, EpochOrder, run_steps
from .runtime import autocast
from .schedules import clip_warmup_cosine


def multi_positive_clip_loss(img: torch.Tensor, txt: torch.Tensor, token_ids: torch.Tensor,
                             logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE where every pair with an identical caption is a positive.

    With 7 classes and a handful of styles, a batch holds many identical captions; treating them
    as negatives (plain CLIP) would push apart features that should match. Targets are the
    uniform distribution over identical-caption partners.
    img, txt: unit-norm [B, D]; token_ids: [B, L].
    """
    logits = logit_scale * img @ txt.t()
    same = (token_ids[:, None, :] == token_ids[None, :, :]).all(-1).float()
    targets = same / same.sum(1, keepdim=True)
    loss_i = torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
    loss_t = torch.sum(-targets * F.log_softmax(logits.t(), dim=1), dim=1).mean()
    return 0.5 * (loss_i + loss_t)


def clip_features(clip: ClipModel, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm image features of x [B, 3, H, W] in [0, 1] and text features of token ids [T, L]."""
    return (F.normalize(clip.model.encode_image(clip.preprocess(x)), dim=-1),
            F.normalize(clip.model.encode_text(tokens), dim=-1))


def clip_probe(clip: ClipModel, images: ImageSet | torch.Tensor, captions: list[str], batch_size: int,
               device: torch.device) -> Probe:
    """`formats` probe of one `train_clip` step: both towers on the first `batch_size` images and captions."""
    images = as_image_set(images)
    n = min(batch_size, len(images))
    x = torch.stack([images[i] for i in range(n)]).to(device).float().div(255)
    tokens = torch.unique(clip._tokenizer(captions[:n]), dim=0).to(device)
    clip = clip.to(device)
    return step_probe({"clip": clip}, lambda clip: sum(f.sum() for f in clip_features(clip, x, tokens)), device)


@contextlib.contextmanager
def caption_vocabulary(model: open_clip.CLIP, tokens: torch.Tensor) -> Iterator[torch.Tensor]:
    """Train only the token-embedding rows the captions use: `tokens` [N, L] renumbered for the block.

    The text tower's table has a row for each of the tokenizer's 49,408 tokens, 87 % of the embedded
    teacher's parameters, and AdamW updated all of them every step. Without that the teacher's
    step runs 1.04x and the smaller CLIP's 1.25x faster (`python benchmarks/clip_step.py`, "whole
    table"; docs/results.md). A row no caption uses gets a zero gradient at every step, so its
    AdamW moments stay 0 and its update is 0 / (0 + eps) = 0 (the table has no weight decay).
    Inside the block the model's table holds just the used rows, in token-id order, and the yielded
    ids index it. Sorted renumbering keeps every comparison of ids (identical captions, open_clip's
    argmax end-of-text pooling, `torch.unique`'s order), so training ends in the same weights, bit
    for bit (tests/test_clip_training.py). On exit the trained rows go back into the full table.
    A checkpoint written inside the block holds the smaller table (`TRAINING_STATE_VERSION`).
    Towers that pool at a given token id (`text_pool_type` other than argmax) train the whole table.
    """
    if getattr(model, "text_pool_type", "argmax") != "argmax":
        yield tokens
        return
    full = model.token_embedding
    used = torch.unique(tokens)  # sorted, so renumbering keeps the order of ids
    renumber = torch.full((full.num_embeddings,), -1, dtype=torch.long)
    renumber[used] = torch.arange(len(used))
    rows = nn.Embedding(len(used), full.embedding_dim, device=full.weight.device, dtype=full.weight.dtype)
    with torch.no_grad():
        rows.weight.copy_(full.weight[used.to(full.weight.device)])
    model.token_embedding = rows  # the same slot of model._modules: parameter order and names unchanged
    try:
        yield renumber[tokens]
    finally:
        with torch.no_grad():
            full.weight[used.to(full.weight.device)] = rows.weight
        model.token_embedding = full


# Bump when what train_clip checkpoints changes shape, so a stage's work key no longer finds the
# older files. 2: the token table holds the captions' rows only (caption_vocabulary).
TRAINING_STATE_VERSION = 2


def format_signature(section_name: str, section, image_size: int) -> dict:
    """What `formats.choose_format` keys a CLIP training loop's probe by: its params section and the
    image side. The teacher stage and benchmarks/clip_step.py share it, so both find one cache entry."""
    return {section_name: dataclasses.asdict(section), "image_size": image_size}


def clip_lr_factor(total: int):
    """The LambdaLR factor of step s out of `total`: warm-up over the first 5 % of steps."""
    warmup = max(1, total // 20)
    return lambda s: clip_warmup_cosine(s, total, warmup)


def train_clip(clip: ClipModel, images: ImageSet | torch.Tensor, captions: list[str], *, epochs: int,
               batch_size: int, lr: float, weight_decay: float, generator: torch.Generator,
               device: torch.device, checkpoints: Checkpoints | None = None, desc: str = "clip",
               workers: int = 0, amp_dtype: torch.dtype | None = None) -> list[float]:
    """Image-caption contrastive training of an embedded CLIP (the teacher or student_clip).

    images: N images (in RAM, or streamed by `workers` DataLoader processes); captions: N strings. AdamW + cosine schedule with warm-up;
    light augmentation (flip, 4-px translation). `checkpoints` makes it resumable
    (`resumable.run_steps`); `desc` names its progress bar. `amp_dtype` (e.g. bf16) runs both
    towers under autocast; the loss, the weights and AdamW's state stay fp32. Returns per-step losses.
    """
    images = as_image_set(images)
    clip.train().to(device)
    with caption_vocabulary(clip.model, clip._tokenizer(captions)) as tokens:
        losses = _train(clip, images, tokens, epochs=epochs, batch_size=batch_size, lr=lr,
                        weight_decay=weight_decay, generator=generator, device=device, checkpoints=checkpoints,
                        desc=desc, workers=workers, amp_dtype=amp_dtype)
    clip.eval()
    return losses


def _train(clip: ClipModel, images: ImageSet, tokens: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
           weight_decay: float, generator: torch.Generator, device: torch.device, checkpoints: Checkpoints | None,
           desc: str, workers: int, amp_dtype: torch.dtype | None) -> list[float]:
    params_decay = [p for n, p in clip.model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    params_other = [p for n, p in clip.model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": params_decay, "weight_decay": weight_decay},
                             {"params": params_other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    batches = EpochOrder(len(images), batch_size, generator)
    reader = EpochReader(images, batches, workers)
    total = epochs * batches.steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, clip_lr_factor(total))

    def step(i: int) -> float:
        idx, images_u8 = reader.batch(i)
        x = flip_translate(images_u8.to(device).float().div(255), generator)
        tok = tokens[idx].to(device)
        # Encode each distinct caption once: batches repeat captions, and the text tower dominates cost.
        uniq, inverse = torch.unique(tok, dim=0, return_inverse=True)
        with autocast(device, amp_dtype):
            img_f, txt_f = clip_features(clip, x, uniq)
        loss = multi_positive_clip_loss(img_f.float(), txt_f.float()[inverse], tok, clip.model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            clip.model.logit_scale.clamp_(0, 4.6052)  # ln(100), as open_clip does
        return loss.item()

    losses = run_steps(step, total, state={"model": clip.model, "optimizer": opt, "scheduler": sched,
                                           "batches": batches},
                       generators=[generator], checkpoints=checkpoints, desc=desc)
    return losses
