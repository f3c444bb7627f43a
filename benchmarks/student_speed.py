"""Inference speed of the teacher's image tower against the students that replace it.

Measures images per second at batch --batch (default 64; the best of 5 rounds of one warm-up and
--reps timed calls, the models taking turns, as speed.json does), parameters and GFLOPs per image (torch's FLOP counter: convolutions and matrix products),
with clipdistill.evaluation's functions, as the evaluate stage reports them, except that FLOPs
are counted with nn.MultiheadAttention's fused inference path off (the counter cannot see inside
it). Teacher = its image tower only: class text features are computed once, before inference.
Weights are random: speed does not depend on them.

  --setting embedded: the embedded teacher (params.yaml teacher section) at world.image_size
      against every student kind (distill section; PromptKD and KDPL over the small CLIP of the
      student_clip section), the default `distill.student` first, each as deployed.
  --setting real: open_clip ViT-B-32 image tower (random weights) at 224 px against a
      torchvision ResNet-18 student at 224 px (CnnStudent's projection head on a ResNet-18 trunk).

--serving adds, for every model exported as the export stage does it (clipdistill/export.py), a
serving table on the CPU: PyTorch and onnxruntime images/s at batch 1 and at --batch, and p50 /
p99 latency of one image (--latency-calls calls).

Run from the repo root, e.g.
  python benchmarks/student_speed.py --setting embedded --serving
  python benchmarks/student_speed.py --setting real --device cuda
  python benchmarks/student_speed.py --setting embedded --batch 2 --reps 1   # smoke run
The last line is the figure: `student/teacher speedup: N.Nx` (the default student / ResNet-18).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision
from common import add_device_args, machine_line, resolve_device

import tempfile
import time
from pathlib import Path

import numpy as np

from clipdistill.clip_models import embedded_clip_from_params, load_open_clip
from clipdistill.evaluation import count_parameters, gflops_per_image, paired_images_per_second
from clipdistill.clip_models import CosineClassifier
from clipdistill.export import export_onnx
from clipdistill.params import load_params
from clipdistill.runtime import run_stage
from clipdistill.students import STUDENTS, CnnStudent

REAL_IMAGE_SIZE = 224


def resnet18_student(class_vectors: torch.Tensor, logit_scale: float) -> CnnStudent:
    """CnnStudent with torchvision's ResNet-18 trunk (ImageNet stem, 512-d pooled feature) in place
    of the CIFAR-style backbone; same projection head, normalisation and cosine logits."""
    student = CnnStudent(class_vectors, logit_scale, head="projection", width=128, depth=1, backbone="cifar_resnet")
    trunk = torchvision.models.resnet18(weights=None)
    trunk.fc = torch.nn.Identity()
    # width 128 gives the head a 4 * 128 = 512-d input, ResNet-18's pooled feature width.
    assert student.backbone.out_dim == 512
    student.backbone = trunk
    return student


def student_label(kind: str, params) -> str:
    if kind == "cnn":
        cnn = params.distill.cnn
        return f"CnnStudent (width {cnn.width}, depth {cnn.depth}, {cnn.head} head)"
    name = {"promptkd": "PromptKD", "kdpl": "KDPL"}.get(kind, kind)
    return f"{name} over the student_clip tower (width {params.student_clip.vision_width})"


def build_models(args):
    """(image size, [(name, module, fn on [B, 3, S, S] in [0, 1], parameters counted, classifier)]);
    teacher first, the student of the final line second. `classifier`: what the export stage
    exports (images -> logits; the teacher's tower against class vectors)."""
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # the random weights
    if args.setting == "embedded":
        params = load_params(args.params)
        size = params.world.image_size
        teacher = embedded_clip_from_params(params.teacher, size)
        class_vectors = F.normalize(torch.randn(len(params.world.classes), teacher.embed_dim, generator=gen), dim=-1)
        teacher_row = (f"teacher: embedded CLIP image tower ({params.teacher.vision}, width {params.teacher.vision_width})",
                       teacher, teacher.encode_image, count_parameters(teacher.model.visual),
                       CosineClassifier.zero_shot(teacher, class_vectors))
        # Every student of the registry, the default (distill.student) first, each timed as the
        # evaluate stage's speed.json times it: as deployed (`classifier()`: KDPL's class text
        # features computed once; parameters of the deployed model).
        kinds = [params.distill.student, *(k for k in STUDENTS if k != params.distill.student)]
        students = []
        for kind in kinds:
            clip = None if kind == "cnn" else embedded_clip_from_params(params.student_clip, size)
            student = STUDENTS[kind].from_params(getattr(params.distill, kind), class_vectors=class_vectors,
                                                 logit_scale=teacher.logit_scale, classes=params.world.classes,
                                                 clip=clip, generator=gen)
            deployed = student.classifier().eval()
            students.append((f"student: {student_label(kind, params)}", deployed, deployed,
                             count_parameters(deployed), deployed))
        models = [teacher_row, *students]
    else:
        size = REAL_IMAGE_SIZE
        teacher = load_open_clip("ViT-B-32", "random")
        class_vectors = F.normalize(torch.randn(1000, teacher.embed_dim, generator=gen), dim=-1)
        student = resnet18_student(class_vectors, teacher.logit_scale)
        models = [("teacher: open_clip ViT-B-32 image tower", teacher, teacher.encode_image,
                   count_parameters(teacher.model.visual), CosineClassifier.zero_shot(teacher, class_vectors)),
                  ("student: ResNet-18 (torchvision) + projection head", student, student,
                   count_parameters(student), student.classifier())]
    return size, models


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("embedded", "real"), default="embedded")
    parser.add_argument("--batch", type=int, default=64, help="images per call")
    parser.add_argument("--reps", type=int, default=5, help="timed calls after one warm-up call")
    parser.add_argument("--params", default="params.yaml", help="params file (embedded setting)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serving", action="store_true", help="add PyTorch vs onnxruntime serving rows (CPU)")
    parser.add_argument("--latency-calls", type=int, default=200, help="batch-1 calls timed for p50/p99 latency")
    add_device_args(parser)
    args = parser.parse_args()
    if min(args.batch, args.reps) < 1:
        raise SystemExit("--batch and --reps must be >= 1")

    device = resolve_device(args)
    print(machine_line(device))
    size, models = build_models(args)
    print(f"setting {args.setting}: {size} px inputs, batch {args.batch}, {args.reps} timed calls, on {device}")
    for _, module, _, _, _ in models:
        module.to(device).eval()
    # as speed.json: best of 5 rounds of --reps calls, the models taking turns
    rates = paired_images_per_second({name: fn for name, _, fn, _, _ in models}, size, device,
                                     batch=args.batch, reps=args.reps)
    # FLOPs are counted with MHA's fast path off; the timing keeps it
    rows = [(name, params, gflops_per_image(fn, size, device), rates[name]) for name, _, fn, params, _ in models]

    teacher_rate = rows[0][3]
    width = max(len(r[0]) for r in rows)
    print(f"{'model':<{width}} {'parameters':>12} {'GFLOPs/img':>11} {'images/s':>10} {'vs teacher':>11}")
    for name, params, gflops, rate in rows:
        print(f"{name:<{width}} {params:>12,} {gflops:>11.4f} {rate:>10.1f} {rate / teacher_rate:>10.1f}x")
    if args.serving:
        serving_table(models, size, args)
    print(f"student/teacher speedup: {rows[1][3] / teacher_rate:.1f}x")


def latencies_ms(run, x, calls: int) -> np.ndarray:
    """Milliseconds of each of `calls` calls of run(x), after two warm-up calls."""
    run(x)
    run(x)
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        run(x)
        out.append((time.perf_counter() - start) * 1e3)
    return np.array(out)


def serving_table(models, size: int, args) -> None:
    """PyTorch (CPU, no grad) and onnxruntime (CPU provider) rows for each exported classifier."""
    import onnxruntime

    print(f"serving on the CPU ({size} px): images/s at batch 1 and {args.batch}, latency of one image "
          f"over {args.latency_calls} calls")
    print(f"{'model':<46} {'runtime':<12} {'img/s b1':>9} {f'img/s b{args.batch}':>10} {'p50 ms':>8} {'p99 ms':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, _, _, _, classifier in models:
            classifier = classifier.cpu().eval()
            path = Path(tmp) / "model.onnx"
            export_onnx(classifier, path, size)
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feed = session.get_inputs()[0].name
            runtimes = {"pytorch": lambda x: classifier(torch.from_numpy(x)),
                        "onnxruntime": lambda x: session.run(None, {feed: x})}
            for runtime, run in runtimes.items():
                with torch.no_grad():
                    one = latencies_ms(run, np.random.rand(1, 3, size, size).astype(np.float32), args.latency_calls)
                    batch = latencies_ms(run, np.random.rand(args.batch, 3, size, size).astype(np.float32),
                                         args.reps)
                print(f"{name.split(' (')[0]:<46} {runtime:<12} {1e3 / np.median(one):>9.1f} "
                      f"{args.batch * 1e3 / batch.mean():>10.1f} {np.percentile(one, 50):>8.2f} "
                      f"{np.percentile(one, 99):>8.2f}")


if __name__ == "__main__":
    run_stage(main)  # a user error (no GPU for --device cuda, bad params) is one line, exit 1
