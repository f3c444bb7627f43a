"""Inference speed of the teacher's image tower against the students that replace it.

Measures images per second at batch --batch (default 64, after one warm-up call, --reps timed
calls), parameters and GFLOPs per image (torch's FLOP counter: convolutions and matrix products),
with clipdistill.evaluation's functions, as the evaluate stage reports them, except that FLOPs
are counted with nn.MultiheadAttention's fused inference path off (the counter cannot see inside
it). Teacher = its image tower only: class text features are computed once, before inference.
Weights are random: speed does not depend on them.

  --setting embedded: the embedded teacher (params.yaml teacher section) at world.image_size
      against the default CnnStudent (distill section), and the PromptKD student over the small
      CLIP of the student_clip section.
  --setting real: open_clip ViT-B-32 image tower (random weights) at 224 px against a
      torchvision ResNet-18 student at 224 px (CnnStudent's projection head on a ResNet-18 trunk).

Run from the repo root, e.g.
  python benchmarks/student_speed.py --setting embedded
  python benchmarks/student_speed.py --setting real --device cuda
  python benchmarks/student_speed.py --setting embedded --batch 2 --reps 1   # smoke run
The last line is the figure: `student/teacher speedup: N.Nx` (the CNN / ResNet-18 student).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision
from common import add_device_args, machine_line, resolve_device

from clipdistill.clip_models import embedded_clip_from_params, load_open_clip
from clipdistill.evaluation import count_parameters, gflops_per_image, images_per_second
from clipdistill.params import load_params
from clipdistill.runtime import run_stage
from clipdistill.prompt_students import PromptKDStudent
from clipdistill.students import CnnStudent

REAL_IMAGE_SIZE = 224


def resnet18_student(class_vectors: torch.Tensor, logit_scale: float) -> CnnStudent:
    """CnnStudent with torchvision's ResNet-18 trunk (ImageNet stem, 512-d pooled feature) in place
    of the CIFAR-style backbone; same projection head, normalisation and cosine logits."""
    student = CnnStudent(class_vectors, logit_scale, head="projection", width=128, depth=1)
    trunk = torchvision.models.resnet18(weights=None)
    trunk.fc = torch.nn.Identity()
    # width 128 gives the head a 4 * 128 = 512-d input, ResNet-18's pooled feature width.
    assert student.backbone.out_dim == 512
    student.backbone = trunk
    return student


def build_models(args):
    """(image size, [(name, module, fn on [B, 3, S, S] in [0, 1], parameters counted)]); teacher first,
    the student of the final line second."""
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # the random weights
    if args.setting == "embedded":
        params = load_params(args.params)
        size = params.world.image_size
        teacher = embedded_clip_from_params(params.teacher, size)
        class_vectors = F.normalize(torch.randn(len(params.world.classes), teacher.embed_dim, generator=gen), dim=-1)
        cnn = CnnStudent.from_params(params.distill.cnn, class_vectors=class_vectors, logit_scale=teacher.logit_scale,
                                     classes=params.world.classes, clip=None, generator=gen)
        small_clip = embedded_clip_from_params(params.student_clip, size)
        promptkd = PromptKDStudent.from_params(params.distill.promptkd, class_vectors=class_vectors,
                                               logit_scale=teacher.logit_scale, classes=params.world.classes,
                                               clip=small_clip, generator=gen)
        cnn_params = params.distill.cnn
        models = [(f"teacher: embedded CLIP image tower ({params.teacher.vision}, width {params.teacher.vision_width})",
                   teacher, teacher.encode_image, count_parameters(teacher.model.visual)),
                  (f"student: CnnStudent (width {cnn_params.width}, depth {cnn_params.depth}, {cnn_params.head} head)",
                   cnn, cnn,
                   count_parameters(cnn)),
                  (f"student: PromptKD over the student_clip tower (width {params.student_clip.vision_width})",
                   promptkd, promptkd, count_parameters(promptkd))]
    else:
        size = REAL_IMAGE_SIZE
        teacher = load_open_clip("ViT-B-32", "random")
        class_vectors = F.normalize(torch.randn(1000, teacher.embed_dim, generator=gen), dim=-1)
        student = resnet18_student(class_vectors, teacher.logit_scale)
        models = [("teacher: open_clip ViT-B-32 image tower", teacher, teacher.encode_image,
                   count_parameters(teacher.model.visual)),
                  ("student: ResNet-18 (torchvision) + projection head", student, student,
                   count_parameters(student))]
    return size, models


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("embedded", "real"), default="embedded")
    parser.add_argument("--batch", type=int, default=64, help="images per call")
    parser.add_argument("--reps", type=int, default=5, help="timed calls after one warm-up call")
    parser.add_argument("--params", default="params.yaml", help="params file (embedded setting)")
    parser.add_argument("--seed", type=int, default=0)
    add_device_args(parser)
    args = parser.parse_args()
    if min(args.batch, args.reps) < 1:
        raise SystemExit("--batch and --reps must be >= 1")

    device = resolve_device(args)
    print(machine_line(device))
    size, models = build_models(args)
    print(f"setting {args.setting}: {size} px inputs, batch {args.batch}, {args.reps} timed calls, on {device}")
    rows = []
    for name, module, fn, params in models:
        module.to(device).eval()
        gflops = gflops_per_image(fn, size, device)  # counts with MHA's fast path off; timing keeps it
        rows.append((name, params, gflops, images_per_second(fn, size, device, batch=args.batch, reps=args.reps)))

    teacher_rate = rows[0][3]
    width = max(len(r[0]) for r in rows)
    print(f"{'model':<{width}} {'parameters':>12} {'GFLOPs/img':>11} {'images/s':>10} {'vs teacher':>11}")
    for name, params, gflops, rate in rows:
        print(f"{name:<{width}} {params:>12,} {gflops:>11.4f} {rate:>10.1f} {rate / teacher_rate:>10.1f}x")
    print(f"student/teacher speedup: {rows[1][3] / teacher_rate:.1f}x")


if __name__ == "__main__":
    run_stage(main)  # a user error (no GPU for --device cuda, bad params) is one line, exit 1
