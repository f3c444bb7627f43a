"""Stage `distill`: train the student against the teacher's logits; no label is used.

distill.student: cnn (a ResNet whose projection head classifies against the stored class vectors,
PromptKD's shared class vectors) | promptkd (frozen smaller CLIP image tower + visual prompts +
projector, logits against the stored class vectors) | kdpl (smaller CLIP with CoOp context and
its own text tower; teacher logits at the student's logit scale; distill.class_agnostic: KDPL-CA).
distill.images: synthetic (data-free, the default) | world (the world's train images, labels
discarded) | a folder of unlabeled images | WebDataset tar shards (`data/imagenet/{00000..01023}.tar`).
A set under data.memory_budget_mb decoded is read into RAM once; a larger one streams, decoded by
data.workers DataLoader processes (clipdistill/image_sets.py).
distill.loss: kl | reverse_kl | symmetric_kl | promptkd on the logits, or feature_l2 | feature_cosine
on the student's projection against the teacher's image feature (cnn and promptkd students), plus
distill.feature_kl_weight x kl.
With distill.base_to_novel, a second student trains on the first half of the classes only
(student_b2n.pt) for the base-to-novel evaluation. Each student's own keys are under
distill.<student> (distill.cnn, distill.promptkd, distill.kdpl).
Under torchrun (`torchrun --nproc_per_node N stages/distill.py ...`) the student trains with
DistributedDataParallel, distill.batch_size being the global batch; rank 0 writes the output.
Training saves its state every distill.checkpoint_every steps in artifacts/.student.work/<key>/
(rank 0 writes, every rank resumes); a rerun after a kill resumes from there.
<out>/live/ is the main student's dvclive log, per epoch: loss, lr and, with
distill.holdout_images > 0, top-1 agreement with the teacher on that many images kept out of
training (evenly spaced).
"""
import sys
from pathlib import Path

# This checkout's package first: an editable install of another clone must not run in its place.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import time
from dataclasses import asdict

import torch

from clipdistill.clip_models import decoding, load_clip
from clipdistill.data import load_shards, load_unlabeled
from clipdistill.formats import choose_format, loop_rate, step_flops, step_probe
from clipdistill.image_sets import ImageSet, expand_shards, fit_in_memory, is_tar_pattern
from clipdistill.live import LIVE_DIR, scheduled_lrs, write_curves
from clipdistill.losses import Outputs, get_loss, logits_of, needs_features
from clipdistill.params import load_params
from clipdistill.prompt_students import class_agnostic_logits, load_classnames
from clipdistill.resumable import Checkpoints
from clipdistill.runtime import (Dist, PipelineError, atomic_dir, init_distributed, run_stage, seed_everything,
                                 setup_torch, stage_args, write_json)
from clipdistill.students import STUDENTS, save_student
from clipdistill.text import class_vectors as text_class_vectors
from clipdistill.text import load_class_vectors
from clipdistill.schedules import cosine_lr
from clipdistill.training import distill, epoch_losses

# KDPL-CA scores thousands of dictionary names: one template keeps that a single text pass.
DICTIONARY_TEMPLATES = ["a photo of a {}."]


def training_images(params, args, teacher) -> ImageSet:
    """The training images with a class index per image or -1 (`.labels`). The index only selects
    the base classes' images for base-to-novel; training itself never reads it."""
    if params.distill.images == "synthetic":
        return load_shards(args.synth, params.world.image_size)[0]
    source = Path(args.world) / "train" if params.distill.images == "world" else params.distill.images
    return load_unlabeled(source, list(params.world.classes), decoding(teacher, params.world.image_size))


def split_holdout(images: ImageSet, n: int) -> tuple[ImageSet, ImageSet | None]:
    """(train images, held-out images): `n` evenly spaced images kept out of training."""
    if n == 0:
        return images, None
    if n > len(images) // 2:
        raise PipelineError(f"distill.holdout_images is {n}, more than half of the {len(images)} training images")
    out = torch.zeros(len(images), dtype=torch.bool)
    out[torch.linspace(0, len(images) - 1, n).round().long()] = True
    return images.subset((~out).nonzero().squeeze(1)), images.subset(out.nonzero().squeeze(1))


def student_format(params, student, teacher, vectors, images: ImageSet, device, dist: Dist):
    """The precision and memory format the distillation loop runs in (clipdistill/formats.py), probed on
    one batch: the teacher's logits and the student's forward and backward pass."""
    n = min(params.distill.batch_size, len(images))
    x = torch.stack([images[i] for i in range(n)]).to(device).float().div(255)

    def step(student, teacher):
        with torch.no_grad():
            teacher.logits(x, vectors)
        return logits_of(student(x))
    probe = step_probe({"student": student, "teacher": teacher}, step, device)
    fmt = choose_format("distill", params.precision, device, probe,
                        {"distill": asdict(params.distill), "image_size": params.world.image_size,
                         "teacher": teacher.spec}, dist)
    if dist.main:
        print(fmt.describe("distill"))
    return fmt, step_flops(probe, fmt)


def train_student(params, classes, vectors, images, teacher, small_clip, generator, device,
                  checkpoints: Checkpoints, dist: Dist = Dist(), holdout: ImageSet | None = None):
    """One student over `classes` (teacher class vectors `vectors` [C, D]) on `images`; returns
    (student on CPU, per-step losses, per-epoch agreement on `holdout`). Its checkpoints go to a
    sub-folder of `checkpoints` named by the chosen format, so a resume never switches format."""
    kind = params.distill.student
    student = STUDENTS[kind].from_params(getattr(params.distill, kind), class_vectors=vectors.cpu(),
                                         logit_scale=teacher.logit_scale, classes=classes, clip=small_clip,
                                         generator=generator)
    student.to(device)
    fmt, flops = student_format(params, student, teacher, vectors, images, device, dist)
    fmt.apply(student)
    checkpoints = checkpoints.sub(fmt.name.replace(" ", "_"))
    student_step = None
    if kind == "kdpl":
        # KDPL: teacher logits at the student's logit scale (100 for pretrained CLIPs).
        target = vectors
        if params.distill.kdpl.class_agnostic:
            names = load_classnames(params.distill.kdpl.classnames_file)
            if params.distill.kdpl.topk > len(names):
                raise PipelineError(f"distill.kdpl.topk is {params.distill.kdpl.topk}, more than the {len(names)} "
                                    f"names of the class-name dictionary "
                                    f"{params.distill.kdpl.classnames_file or 'clipdistill/assets/classnames.txt'}")
            target = text_class_vectors(teacher, names, DICTIONARY_TEMPLATES).to(device)
            student.set_classnames(names)
            topk = params.distill.kdpl.topk
            student_step = lambda model, x, t: class_agnostic_logits(model, x, t, topk)[:2]  # noqa: E731
        teacher_logits = lambda x: student.logit_scale * teacher.encode_image(x) @ target.t()  # noqa: E731
    elif needs_features(params.distill.loss):
        # Feature losses: the teacher's unit-norm image feature and its logits from one pass; the
        # student gives its projection too.
        def teacher_logits(x):
            feature = teacher.encode_image(x)
            return Outputs(teacher.logit_scale * feature @ vectors.t(), feature)
        student_step = lambda model, x, t: (model(x, features=True), t)  # noqa: E731
    else:
        teacher_logits = lambda x: teacher.logits(x, vectors)  # noqa: E731
    loss_fn = get_loss(params.distill.loss, params.distill.kd_weight, params.distill.feature_kl_weight)
    start = time.perf_counter()
    losses, agreement = distill(student, teacher_logits, images, loss_fn, temperature=params.distill.temperature,
                                epochs=params.distill.epochs, batch_size=params.distill.batch_size,
                                lr=params.distill.lr, weight_decay=params.distill.weight_decay,
                                augment=params.distill.augment, optimizer=params.distill.optimizer,
                                generator=generator, device=device, student_step=student_step,
                                amp_dtype=fmt.amp_dtype, dist=dist,
                                checkpoints=checkpoints, holdout=holdout, workers=params.data.workers)
    if dist.main:
        print(loop_rate(f"distill ({len(classes)} classes)", flops, len(losses), time.perf_counter() - start))
    student.set_classes(classes, vectors.cpu())  # KDPL-CA: back from the dictionary to the task's classes
    return student.cpu(), losses, agreement


def epoch_curves(params, losses: list[float], agreement: list[float]) -> dict[str, list[float]]:
    """Per-epoch loss, learning rate (at the epoch's last step) and holdout agreement, for live/."""
    steps_per_epoch = len(losses) // params.distill.epochs
    lrs = scheduled_lrs(params.distill.lr, lambda s: cosine_lr(s, len(losses), steps_per_epoch), len(losses))
    curves = {"loss": epoch_losses(losses, params.distill.epochs), "lr": lrs[steps_per_epoch - 1::steps_per_epoch]}
    if agreement:
        curves["holdout_agreement"] = agreement
    return curves


def main():
    args = stage_args(__doc__, "synth", "world", "teacher", "student_clip", "text_features", "out")
    params = load_params(args.params)
    dist, device = init_distributed(setup_torch(params.device, params.threads))
    generator = seed_everything(params.seed)
    teacher = load_clip(args.teacher, device)
    images = fit_in_memory(training_images(params, args, teacher), params.data.memory_budget_mb, params.data.workers,
                           "distill")
    images, holdout = split_holdout(images, params.distill.holdout_images)
    small_clip = load_clip(args.student_clip, device) if params.distill.student != "cnn" else None
    stored = load_class_vectors(args.text_features)
    classes, vectors = list(stored["classes"]), stored["features"].to(device)
    inputs = [args.teacher, args.text_features, args.student_clip]
    inputs += ([args.synth] if params.distill.images == "synthetic" else [Path(args.world) / "train"]
               if params.distill.images == "world" else expand_shards(params.distill.images)
               if is_tar_pattern(params.distill.images) else [params.distill.images])
    checkpoints = Checkpoints.for_stage(
        args.out, {"distill": asdict(params.distill), "seed": params.seed, "threads": params.threads,
                   "device": params.device, "precision": params.precision, "processes": dist.processes},
        inputs, params.distill.checkpoint_every, dist)
    student, losses, agreement = train_student(params, classes, vectors, images, teacher, small_clip, generator,
                                               device, checkpoints.sub("student"), dist, holdout)
    curves = epoch_curves(params, losses, agreement)
    history = [{"epoch": e, "loss": loss} for e, loss in enumerate(curves["loss"])]
    base_student = None
    if params.distill.base_to_novel:
        n_base = len(classes) // 2
        if n_base < 1:
            raise PipelineError("distill.base_to_novel needs at least 2 classes")
        keep = (images.labels >= 0) & (images.labels < n_base)
        if keep.sum() < params.distill.batch_size:
            raise PipelineError(f"distill.base_to_novel: only {int(keep.sum())} training images belong to the base "
                                f"classes {classes[:n_base]} (a folder must be <root>/<domain>/<class>/*)")
        base_student, _, _ = train_student(params, classes[:n_base], vectors[:n_base],
                                           images.subset(keep.nonzero().squeeze(1)), teacher,
                                           small_clip, generator, device, checkpoints.sub("student_b2n"), dist)
    dist.close()
    if not dist.main:
        return
    with atomic_dir(args.out) as tmp:
        save_student(student, tmp / "student.pt")
        if base_student is not None:
            save_student(base_student, tmp / "student_b2n.pt")
        write_json(tmp / "history.json", history)
        write_curves(tmp / LIVE_DIR, curves)
    checkpoints.clear()
    print(f"distill: {params.distill.student} student, {len(history) and history[-1]['epoch'] + 1} epochs on "
          f"{len(images)} {params.distill.images} images, final loss {history[-1]['loss']:.4f}")


if __name__ == "__main__":
    run_stage(main)
