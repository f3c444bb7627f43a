"""Memory and throughput of the data path as the image set grows: N = 2 k, 20 k and 100 k JPEGs.

Makes one set of cheap renders (a gradient and a coloured box per image, JPEG quality 90, at
--image-size px) written as WebDataset tar shards of 1,000 images with `.cls` labels, the layout
img2dataset writes. For each N (the first N / 1,000 shards) one fresh process runs one epoch of
`training.distill` with the set as `distill.images` and another `evaluation.domain_accuracies`
over it (as the distill and evaluate stages run), both through `data.load_unlabeled` and the memory budget
(`--budget-mb`, data.memory_budget_mb: a set under it is read into RAM once, a larger one
streams through --workers DataLoader processes). The student and teacher are the embedded
default's CNN student and teacher tower (random weights), fed the batch resized on the device to
32 px, so the figures measure the data path (decode, transfer, augmentation), not a ViT.

Peak memory is sampled every 0.1 s as the proportional set size (PSS) of the process and its
DataLoader workers together (shared pages counted once), separately for distill and evaluate.

  python benchmarks/scaling.py                          # 2k, 20k, 100k at 224 px (~40 min on 2 cores)
  python benchmarks/scaling.py --sizes 2000,20000       # fewer sizes
  python benchmarks/scaling.py --sizes 64,128 --image-size 32 --per-shard 32   # smoke run

The last two lines are the figures: `peak RSS ratio N=100k/N=2k: X.XX` (the larger of distill's
and evaluate's ratio of peak PSS) and `images/s at N=100k: N` (distill's epoch; evaluate's with `--phases evaluate`).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

from common import machine_line

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from PIL import Image

from clipdistill.clip_models import embedded_clip_from_params
from clipdistill.data import fit_domains, load_unlabeled
from clipdistill.evaluation import domain_accuracies
from clipdistill.image_sets import fit_in_memory
from clipdistill.losses import get_loss
from clipdistill.params import load_params
from clipdistill.preprocess import clip_default
from clipdistill.runtime import setup_torch
from clipdistill.students import STUDENTS
from clipdistill.training import distill

MODEL_SIDE = 32  # the embedded default's side: what the teacher and student compute at
CLASSES = ["circle", "square"]


def render(index: int, size: int) -> bytes:
    """One cheap JPEG: a vertical gradient and a box, class index % 2 (box or not)."""
    rng = np.random.default_rng(index)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = np.linspace(0, 255, size, dtype=np.uint8)[:, None, None]
    img[..., rng.integers(3)] = rng.integers(256)
    if index % 2:
        a, b = sorted(rng.integers(0, size, 2))
        img[a:b + 1, a:b + 1] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shard(job: tuple[Path, int, int, int]) -> None:
    path, start, end, size = job
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        for i in range(start, end):
            for name, data in ((f"{i:07d}.jpg", render(i, size)), (f"{i:07d}.cls", str(i % 2).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def make_shards(folder: Path, n: int, per_shard: int, size: int) -> None:
    """folder/{00000..}.tar holding images 0..n-1; shards already there are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"{s // per_shard:05d}.tar", s, min(s + per_shard, n), size) for s in range(0, n, per_shard)]
    todo = [job for job in jobs if not job[0].is_file()]
    if todo:
        print(f"rendering {sum(j[2] - j[1] for j in todo):,} JPEGs at {size} px into {folder}", flush=True)
        with Pool(os.cpu_count()) as pool:
            pool.map(write_shard, todo)


class PeakMemory:
    """Peak PSS of this process and its children (DataLoader workers), sampled on a thread."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except psutil.Error:  # a worker that just exited
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def run_one(args) -> dict:
    """One N, one phase (distill one epoch, or evaluate) in this process; figures as a dict."""
    device = setup_torch(args.device, args.threads)
    params = load_params(args.params)
    n_shards = -(-args.n // args.per_shard)
    spec = str(Path(args.data) / ("{00000..%05d}.tar" % (n_shards - 1)))
    prep = clip_default(args.image_size)
    torch.manual_seed(0)
    teacher = embedded_clip_from_params(params.teacher, MODEL_SIDE).to(device).eval()
    vectors = F.normalize(torch.randn(len(CLASSES), teacher.embed_dim), dim=-1).to(device)
    student = STUDENTS["cnn"].from_params(params.distill.cnn, class_vectors=vectors.cpu(),
                                          logit_scale=teacher.logit_scale, classes=CLASSES, clip=None,
                                          generator=torch.Generator().manual_seed(0))
    down = lambda x: F.interpolate(x, size=MODEL_SIDE, mode="bilinear", antialias=True)  # noqa: E731
    teacher_logits = lambda x: teacher.logits(down(x), vectors)  # noqa: E731
    out = {"n": args.n}
    if args.phase == "evaluate":
        with PeakMemory() as mem:
            domains = fit_domains({"all": load_unlabeled(spec, CLASSES, prep)}, args.budget_mb, args.workers,
                                  "evaluate")
            start = time.perf_counter()
            acc, _ = domain_accuracies(lambda x: student(down(x)), domains, args.batch * 4, device, args.workers)
            seconds = time.perf_counter() - start
        return {**out, "evaluate_peak_mb": mem.peak / 2**20, "evaluate_images_per_s": args.n / seconds}
    with PeakMemory() as mem:
        images = fit_in_memory(load_unlabeled(spec, CLASSES, prep), args.budget_mb, args.workers, "distill")
        start = time.perf_counter()
        losses, _ = distill(student.to(device), teacher_logits, images, get_loss("kl", 1.0), temperature=4.0,
                            epochs=1, batch_size=args.batch, lr=1e-3, weight_decay=0.0, augment=True,
                            generator=torch.Generator().manual_seed(0), device=device,
                            student_step=lambda model, x, t: (model(down(x)), t), workers=args.workers)
        seconds = time.perf_counter() - start
    return {**out, "distill_peak_mb": mem.peak / 2**20, "distill_images_per_s": len(losses) * args.batch / seconds,
            "distill_in_ram": type(images).__name__ == "Tensors"}


def label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 and n >= 1000 else str(n)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,20000,100000", help="comma-separated N, smallest first")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--per-shard", type=int, default=1000, help="images per tar shard")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes (data.workers)")
    parser.add_argument("--budget-mb", type=float, default=None,
                        help="data.memory_budget_mb (default: the params file's)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default=None, help="folder of the rendered shards (default: a temp folder)")
    parser.add_argument("--phases", default="distill,evaluate", help="which of distill, evaluate to run")
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)  # internal: run one N, one phase, in this process
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.budget_mb is None:
        args.budget_mb = load_params(args.params).data.memory_budget_mb
    if args.n is not None:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    phases = [p for p in ("distill", "evaluate") if p in args.phases.split(",")]
    print(machine_line(torch.device(args.device if args.device != "auto" else "cpu")))
    with tempfile.TemporaryDirectory(prefix="scaling_") as tmp:
        data = Path(args.data or tmp)
        make_shards(data, max(sizes), args.per_shard, args.image_size)
        results = []
        for n in sizes:
            r = {"n": n}
            for phase in phases:  # each in a fresh process, as the distill and evaluate stages run
                cmd = [sys.executable, __file__, "--n", str(n), "--phase", phase, "--data", str(data),
                       "--image-size", str(args.image_size), "--per-shard", str(args.per_shard), "--workers",
                       str(args.workers), "--budget-mb", str(args.budget_mb), "--batch", str(args.batch), "--device",
                       args.device, "--threads", str(args.threads), "--params", args.params]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"N={n} {phase} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
                r.update(json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:]))
            results.append(r)
            parts = []
            if "distill_peak_mb" in r:
                parts.append(f"distill {'in RAM' if r['distill_in_ram'] else 'streamed'}, peak {r['distill_peak_mb']:,.0f} "
                             f"MB, {r['distill_images_per_s']:,.1f} images/s")
            if "evaluate_peak_mb" in r:
                parts.append(f"evaluate peak {r['evaluate_peak_mb']:,.0f} MB, {r['evaluate_images_per_s']:,.1f} images/s")
            print(f"N={label(n)} ({args.image_size} px, {args.workers} workers, budget {args.budget_mb:g} MB): "
                  + "; ".join(parts), flush=True)
    first, last = results[0], results[-1]
    ratio = max(last[f"{p}_peak_mb"] / first[f"{p}_peak_mb"] for p in phases)
    print(f"peak RSS ratio N={label(last['n'])}/N={label(first['n'])}: {ratio:.2f}")
    print(f"images/s at N={label(last['n'])}: {last[f'{phases[0]}_images_per_s']:.0f}")


if __name__ == "__main__":
    main()
