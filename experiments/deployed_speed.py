"""GFLOPs and images/s of a trained student in its deployed form against the teacher's image tower.

A prompt student's `classifier()` is what export ships: KDPL's text features computed once, not
on every call as its training forward does (the evaluate stage's speed.json times that forward).
Batch 64, CPU, best of 3 runs of 20 calls, torch's FLOP counter; reads trained artifacts.

  python experiments/deployed_speed.py --student artifacts/sweeps/vocab_kdpl/seed0/student/student.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipdistill.clip_models import load_clip  # noqa: E402
from clipdistill.evaluation import gflops_per_image, images_per_second  # noqa: E402
from clipdistill.students import load_student  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="artifacts/teacher")
    parser.add_argument("--student", default="artifacts/student/student.pt")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    teacher = load_clip(args.teacher, device)
    student = load_student(args.student, device).eval()
    rows = {}
    with torch.no_grad():
        for name, fn in (("teacher image tower", teacher.encode_image),
                         ("student, deployed (classifier())", student.classifier().eval())):
            rate = max(images_per_second(fn, args.image_size, device, batch=64, reps=20) for _ in range(3))
            rows[name] = (gflops_per_image(fn, args.image_size, device), rate)
            print(f"{name}: {rows[name][0]:.4f} GFLOPs, {rate:.0f} images/s")
    (tg, tr), (sg, sr) = rows.values()
    print(f"student/teacher: {sg / tg:.2f}x the GFLOPs, {sr / tr:.2f}x the images/s")


if __name__ == "__main__":
    main()
