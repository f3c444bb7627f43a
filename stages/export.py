"""Stage `export`: the distilled student, and the teacher's image tower, as standalone classifiers.

Writes <out>/{student,teacher}.onnx (opset 18, dynamic batch), .pt2 (torch.export programs) and
.json (class names, input size, mean/std, how it was made), and metrics.json: each file's logits
against PyTorch's on the evaluation images (at most export.parity_images of them, evenly spaced).
A file whose logits differ by more than 1e-4, or whose top class differs on more than 0.1 % of
the images, fails the stage. Runs on the CPU (onnxruntime's CPU provider is the reference).
"""
import sys
from pathlib import Path

# This checkout's package first: an editable install of another clone must not run in its place.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hashlib
import json
from dataclasses import asdict

import torch

from clipdistill.clip_models import CosineClassifier, decoding, load_clip
from clipdistill.data import load_domain_folder, world_test_root
from clipdistill.image_sets import decode_all
from clipdistill.export import export_classifier
from clipdistill.params import load_params
from clipdistill.runtime import atomic_dir, run_stage, setup_torch, stage_args, write_json
from clipdistill.students import load_student
from clipdistill.text import load_class_vectors


def parity_images(domains: dict, n: int, workers: int) -> torch.Tensor:
    """About `n` evaluation images, evenly spaced over the domains in order, decoded (uint8)."""
    total = sum(len(images) for images in domains.values())
    step = max(1, -(-total // n))
    picked, offset = [], 0
    for images in domains.values():
        first = (-offset) % step  # the global stride continues across domains
        picked.append(decode_all(images.subset(torch.arange(first, len(images), step)), workers).images)
        offset += len(images)
    return torch.cat(picked)


def main():
    args = stage_args(__doc__, "world", "teacher", "text_features", "student", "out")
    params = load_params(args.params)
    setup_torch("cpu", params.threads)
    stored = load_class_vectors(args.text_features)
    classes = list(stored["classes"])
    size = params.world.image_size
    teacher = load_clip(args.teacher)
    prep = decoding(teacher, size)
    images = parity_images(load_domain_folder(world_test_root(params, args.world), classes, prep,
                                              params.world.eval_domains), params.export.parity_images,
                           params.data.workers)
    made_by = {"student": params.distill.student, "teacher": teacher.spec, "seed": params.seed,
               "params_sha256": hashlib.sha256(json.dumps(asdict(params), sort_keys=True).encode()).hexdigest()}
    models = {"student": load_student(Path(args.student) / "student.pt").classifier(),
              "teacher": CosineClassifier.zero_shot(teacher, stored["features"])}
    with atomic_dir(args.out) as tmp:
        metrics = {name: export_classifier(model, tmp, name, classes, prep, made_by, images, params.eval.batch_size)
                   for name, model in models.items()}
        write_json(tmp / "metrics.json", metrics)
    for name, checks in metrics.items():
        print(f"export: {name}: " + ", ".join(f"{fmt} max |diff| {c['max_abs_diff']:.1e}, argmax agreement "
                                              f"{c['argmax_agreement']:.4f}" for fmt, c in checks.items())
              + f" on {len(images)} images")


if __name__ == "__main__":
    run_stage(main)
