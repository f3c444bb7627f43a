"""Stage `synthesize`: VQGAN-CLIP images for every prompt, batched, sharded and resumable.

Writes <out>/shards/shard_*.tar (WebDataset shards: <prompt id>.png, .cls, .json per image),
<out>/index.csv (shard, row, prompt_id, class, label, prompt, seed, teacher_confidence) and
<out>/preview.png. Killing it and rerunning keeps finished shards. The output is read one shard
at a time, so its memory does not grow with the number of images.

Under torchrun (`torchrun --nproc_per_node N stages/synthesize.py ...`) rank r synthesizes shards
r, r + N, r + 2N, ... (one GPU each on CUDA); rank 0 waits for all, then assembles the output.
Every image's latent init and every batch's cutout draws depend only on the seed and the prompt
ids, so N processes write the same shards as one.
"""
import sys
from pathlib import Path

# This checkout's package first: an editable install of another clone must not run in its place.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import math
import time
from dataclasses import asdict

import pandas as pd
import torch

from clipdistill.clip_models import fold_batchnorm, load_clip
from clipdistill.diversity import ClassSums, diversity_report
from clipdistill.formats import choose_format, loop_rate, step_flops
from clipdistill.params import load_params
from clipdistill.progress import progress
from clipdistill.prompts import load_prompts
from clipdistill.runtime import atomic_dir, init_distributed, run_stage, setup_torch, stage_args, write_json
from clipdistill.resumable import remove_work_dir, work_dir, work_key
from clipdistill.shards import (PREVIEW_PER_CLASS, finalize, load_shard, preview_grid, save_shard, shard_name,
                                shard_ranges)
from clipdistill.synthesis import synthesis_probe, synthesize_shard
from clipdistill.text import load_class_vectors
from clipdistill.vqgan import load_checkpoint as load_vqgan


def index_rows(i: int, shard: dict, table: pd.DataFrame) -> list[dict]:
    """index.csv's rows of shard `i`."""
    return [{"shard": shard_name(i), "row": r, "prompt_id": pid, "class": table["class"][pid],
             "label": int(table["label"][pid]), "prompt": table["text"][pid],
             "description": table["description"][pid], "seed": int(shard["seeds"][r]),
             "teacher_confidence": round(float(shard["confidence"][r]), 6)}
            for r, pid in enumerate(shard["prompt_ids"].tolist())]


def summarize(work: Path, n_shards: int, table: pd.DataFrame, teacher, device, n_classes: int,
              per_row: int = PREVIEW_PER_CLASS) -> tuple[pd.DataFrame, ClassSums, dict]:
    """(index table, per-class sums of the images' teacher features, the preview's images) from
    the finished shards, one shard in memory at a time."""
    rows, sums, preview = [], ClassSums(), {c: [] for c in range(n_classes)}
    for i in range(n_shards):
        shard = load_shard(work / shard_name(i))
        shard_rows = index_rows(i, shard, table)
        rows += shard_rows
        with torch.no_grad():
            feats = torch.cat([teacher.encode_image(shard["images"][b:b + 256].float().div(255).to(device)).cpu()
                               for b in range(0, len(shard["images"]), 256)])
        sums.add(feats, [row["label"] for row in shard_rows])
        for r, row in enumerate(shard_rows):
            if len(preview[row["label"]]) < per_row:
                preview[row["label"]].append(shard["images"][r])
    return pd.DataFrame(rows), sums, preview


def main():
    args = stage_args(__doc__, "prompts", "generator", "teacher", "text_features", "out")
    params = load_params(args.params)
    dist, device = init_distributed(setup_torch(params.device, params.threads))
    table, targets = load_prompts(args.prompts)
    targets = targets.to(device)
    teacher = fold_batchnorm(load_clip(args.teacher, device))  # frozen: BN folded into its convs
    vqgan = load_vqgan(Path(args.generator) / "vqgan.pt").to(device).eval().requires_grad_(False)
    class_vectors = load_class_vectors(args.text_features)["features"].to(device)
    latent_side = params.world.image_size // vqgan.downsample_factor
    optimise = {"lr": params.synthesize.lr, "cutn": params.synthesize.cutn, "cut_pow": params.synthesize.cut_pow,
                "min_cut": params.synthesize.min_cut, "augment": params.synthesize.augment,
                "latent_hw": (latent_side, latent_side)}
    probe = synthesis_probe(vqgan, teacher, targets[:params.synthesize.batch_size], **optimise)
    fmt = choose_format("synthesize", params.precision, device, probe,
                        {"synthesize": vars(params.synthesize), "image_size": params.world.image_size,
                         "teacher": teacher.spec, "vqgan": asdict(vqgan.cfg)}, dist)
    if dist.main:
        print(fmt.describe("synthesize"))
    flops = step_flops(probe, fmt)  # one step of a full batch (and its final decode)
    vqgan, teacher = fmt.apply(vqgan), fmt.apply(teacher)

    out = Path(args.out)
    key = work_key({"synthesize": vars(params.synthesize), "seed": params.seed, "image_size": params.world.image_size,
                    "precision": params.precision, "device": params.device, "threads": params.threads,
                    "format": fmt.name},
                   [Path(args.prompts) / "features.pt", Path(args.generator) / "vqgan.pt",
                    Path(args.teacher) / "clip.pt", Path(args.text_features) / "class_vectors.pt"])
    work = work_dir(out, key)
    work.mkdir(parents=True, exist_ok=True)
    ranges = shard_ranges(len(table), params.synthesize.shard_size)
    rank_shards = [i for i in range(len(ranges)) if i % dist.processes == dist.rank]
    todo = [i for i in rank_shards if load_shard(work / shard_name(i)) is None]
    rank_label = f"rank {dist.rank}/{dist.processes}: " if dist.processes > 1 else ""
    print(f"synthesize: {rank_label}{len(rank_shards)} shards, {len(rank_shards) - len(todo)} already done "
          f"(work key {key})")
    bar = progress(sum(ranges[i][1] - ranges[i][0] for i in todo), desc="synthesize", unit="img",
                   enabled=dist.main)
    labels = torch.tensor(table["label"].to_numpy(), device=device)
    start = time.perf_counter()
    for i in todo:
        shard = synthesize_shard(vqgan, teacher, targets, class_vectors, labels, *ranges[i],
                                 seed=params.seed, batch_size=params.synthesize.batch_size, progress=bar,
                                 steps=params.synthesize.steps, amp_dtype=fmt.amp_dtype, **optimise)
        save_shard(work / shard_name(i), shard.pop("images"), [f"{pid:09d}" for pid in shard["prompt_ids"].tolist()],
                   labels=labels[shard["prompt_ids"]].cpu(), **shard)
    bar.close()
    batch_steps = sum(math.ceil((ranges[i][1] - ranges[i][0]) / params.synthesize.batch_size) for i in todo)
    if todo:
        loop = f"synthesize rank {dist.rank}" if dist.processes > 1 else "synthesize"
        print(loop_rate(loop, flops, batch_steps * params.synthesize.steps, time.perf_counter() - start))
    dist.barrier()  # every rank's shards are on disk
    if not dist.main:
        dist.close()
        return

    # Xuan et al.'s diversity, measured: per class, mean pairwise cosine distance of the images'
    # teacher features (the prompts stage reports the same for the prompts' text features).
    index, sums, preview = summarize(work, len(ranges), table, teacher, device, len(params.world.classes))
    metrics = {"image_diversity": diversity_report(sums, None, list(params.world.classes)),
               "teacher_confidence": round(float(index["teacher_confidence"].mean()), 4)}
    with atomic_dir(out) as tmp:
        index.to_csv(tmp / "index.csv", index=False)
        write_json(tmp / "metrics.json", metrics)
        preview_grid(preview).save(tmp / "preview.png")
        finalize(work, tmp, [shard_name(i) for i in range(len(ranges))])
    remove_work_dir(work)
    dist.close()
    print(f"synthesize: {len(index)} images; mean teacher confidence {metrics['teacher_confidence']:.3f}, "
          f"image diversity {metrics['image_diversity']['mean']:.4f}")


if __name__ == "__main__":
    run_stage(main)
