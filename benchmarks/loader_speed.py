"""Does the streaming loader keep the device busy? Distill images/s of a ResNet-18 student at
224 px fed by `image_sets.batches` from WebDataset tar shards of JPEGs (decoded by --workers
DataLoader processes, pinned memory, non-blocking copies), against the same images already
resident on the device as uint8 tensors.

Both runs are the project's `training.distill` step (augmentation on the device, AdamW, KL to the
teacher's logits), with a deliberately cheap frozen teacher (a random linear map of the 8x8-pooled
image), so the student and the data path are what is timed. Random weights: throughput does not
depend on them. The first --warmup steps are not timed.

  python benchmarks/loader_speed.py --device cuda                    # 4,096 images, batch 256, 8 workers
  python benchmarks/loader_speed.py --device cpu --images 64 --batch 8 --workers 1 --image-size 64  # smoke run

Last line: `distill images/s ResNet-18 at <S> px: device-resident X, streamed by W workers Y (Y/X = R)`.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import add_device_args, machine_line, resolve_device, synchronize
from scaling import make_shards

import torch
import torch.nn.functional as F

from clipdistill.data import load_unlabeled
from clipdistill.image_sets import Tensors, decode_all
from clipdistill.losses import get_loss
from clipdistill.preprocess import clip_default
from clipdistill.runtime import resolve_precision
from clipdistill.students import CnnStudent
from clipdistill.training import distill


def timed_epoch(images, device, args) -> float:
    """Images/s of one epoch of distill on `images`, after --warmup untimed steps."""
    torch.manual_seed(0)
    vectors = F.normalize(torch.randn(10, 64), dim=-1)
    student = CnnStudent(vectors, 100.0, head="projection", width=0, depth=0, backbone="resnet18").to(device)
    teacher = torch.nn.Linear(3 * 8 * 8, 10).to(device).requires_grad_(False)
    teacher_logits = lambda x: teacher(F.adaptive_avg_pool2d(x, 8).flatten(1))  # noqa: E731
    marks = []

    def step_student(model, x, t):
        marks.append(time.perf_counter())
        return model(x), t

    distill(student, teacher_logits, images, get_loss("kl", 1.0), temperature=4.0, epochs=1, batch_size=args.batch,
            lr=1e-3, weight_decay=0.0, augment=True, generator=torch.Generator().manual_seed(0), device=device,
            student_step=step_student, amp_dtype=resolve_precision("auto", device), workers=args.workers)
    synchronize(device)
    end = time.perf_counter()
    timed_steps = len(marks) - args.warmup
    return timed_steps * args.batch / (end - marks[args.warmup])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(parser)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    args = parser.parse_args()
    if args.images // args.batch <= args.warmup:
        parser.error(f"--images {args.images} gives {args.images // args.batch} steps of --batch {args.batch}; "
                     f"more than --warmup {args.warmup} are needed")
    device = resolve_device(args)
    print(machine_line(device))
    with tempfile.TemporaryDirectory(prefix="loader_") as tmp:
        make_shards(Path(tmp), args.images, 512, args.image_size)
        streamed = load_unlabeled(str(Path(tmp) / "*.tar"), [], clip_default(args.image_size))
        resident = decode_all(streamed, args.workers)
        resident = Tensors(resident.images.to(device), resident.labels)
        ram = timed_epoch(resident, device, args)
        stream = timed_epoch(streamed, device, args)
    print(f"distill images/s ResNet-18 at {args.image_size} px: device-resident {ram:,.1f}, streamed by "
          f"{args.workers} workers {stream:,.1f} (streamed/resident = {stream / ram:.2f})")


if __name__ == "__main__":
    main()
