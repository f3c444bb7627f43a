"""Stage `synthesize`: VQGAN-CLIP images for every prompt, batched, sharded and resumable.

Writes <out>/shards/shard_*.pt, <out>/index.csv (shard, row, prompt_id, class, label, prompt,
seed, teacher_confidence) and <out>/preview.png. Killing it and rerunning keeps finished shards.

Under torchrun (`torchrun --nproc_per_node N stages/synthesize.py ...`) rank r synthesizes shards
r, r + N, r + 2N, ... (one GPU each on CUDA); rank 0 waits for all, then assembles the output.
Every image's latent init and every batch's cutout draws depend only on the seed and the prompt
ids, so N processes write the same shards as one.
"""
import sys
from pathlib import Path

# This checkout's package first: an editable install of another clone must not run in its place.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import pandas as pd
import torch
from tqdm import tqdm

from clipdistill.clip_models import fold_batchnorm, load_teacher
from clipdistill.diversity import diversity_report
from clipdistill.params import load_params
from clipdistill.prompts import load_prompts
from clipdistill.runtime import (atomic_dir, channels_last, init_distributed, resolve_precision, run_stage, setup_torch,
                                 stage_args, write_json)
from clipdistill.resumable import remove_work_dir, work_dir, work_key
from clipdistill.shards import finalize, load_shard, preview_grid, save_shard, shard_name, shard_ranges
from clipdistill.synthesis import synthesize_batch
from clipdistill.text import load_class_vectors
from clipdistill.vqgan import load_checkpoint as load_vqgan


def image_seed(seed: int, prompt_id: int) -> int:
    """Each image's latent init depends only on (seed, prompt id), not on batching or ranks."""
    return seed * 1_000_003 + prompt_id


def main():
    args = stage_args(__doc__, "prompts", "generator", "teacher", "text_features", "out")
    p = load_params(args.params)
    s = p.synthesize
    dist, device = init_distributed(setup_torch(p.device, p.threads))
    amp = resolve_precision(p.precision, device)
    table, targets = load_prompts(args.prompts)
    teacher = fold_batchnorm(load_teacher(args.teacher, device))  # frozen: BN folded into its convs
    vqgan = channels_last(load_vqgan(Path(args.generator) / "vqgan.pt").to(device).eval().requires_grad_(False), device)
    cv = load_class_vectors(args.text_features)
    class_vectors = cv["features"].to(device)
    targets = targets.to(device)
    f = vqgan.downsample_factor
    latent_hw = (p.world.image_size // f, p.world.image_size // f)

    out = Path(args.out)
    key = work_key({"synthesize": vars(s), "seed": p.seed, "image_size": p.world.image_size,
                    "precision": p.precision, "device": p.device, "threads": p.threads},
                   [Path(args.prompts) / "features.pt", Path(args.generator) / "vqgan.pt",
                    Path(args.teacher) / "teacher.pt", Path(args.text_features) / "class_vectors.pt"])
    work = work_dir(out, key)
    work.mkdir(parents=True, exist_ok=True)
    ranges = shard_ranges(len(table), s.shard_size)
    mine = [i for i in range(len(ranges)) if i % dist.world == dist.rank]
    todo = [i for i in mine if load_shard(work / shard_name(i)) is None]
    who = f"rank {dist.rank}/{dist.world}: " if dist.world > 1 else ""
    print(f"synthesize: {who}{len(mine)} shards, {len(mine) - len(todo)} already done (work key {key})")
    bar = tqdm(total=sum(ranges[i][1] - ranges[i][0] for i in todo), desc="synthesize", unit="img",
               disable=None if dist.main else True)
    for i in todo:
        start, end = ranges[i]
        images, conf = [], []
        for b0 in range(start, end, s.batch_size):
            ids = list(range(b0, min(b0 + s.batch_size, end)))
            inits = [torch.Generator().manual_seed(image_seed(p.seed, j)) for j in ids]
            step_gen = torch.Generator().manual_seed(image_seed(p.seed, b0) ^ 0x5EED)
            x = synthesize_batch(vqgan, teacher, targets[ids], steps=s.steps, lr=s.lr, cutn=s.cutn,
                                 cut_pow=s.cut_pow, min_cut=s.min_cut, augment=s.augment,
                                 latent_hw=latent_hw, init_generators=inits, generator=step_gen, amp_dtype=amp)
            with torch.no_grad():
                probs = teacher.logits(x, class_vectors).softmax(-1)
            labels = torch.tensor(table["label"].iloc[ids].to_numpy(), device=device)
            conf.append(probs.gather(1, labels[:, None]).squeeze(1).cpu())
            images.append(x.mul(255).round().to(torch.uint8).cpu())
            bar.update(len(ids))
        save_shard(work / shard_name(i), torch.cat(images), prompt_ids=torch.arange(start, end),
                   seeds=torch.tensor([image_seed(p.seed, j) for j in range(start, end)]),
                   confidence=torch.cat(conf))
    bar.close()
    dist.barrier()  # every rank's shards are on disk
    if not dist.main:
        dist.close()
        return

    rows, all_images = [], []
    for i, (start, end) in enumerate(ranges):
        shard = load_shard(work / shard_name(i))
        all_images.append(shard["images"])
        for r, pid in enumerate(shard["prompt_ids"].tolist()):
            rows.append({"shard": shard_name(i), "row": r, "prompt_id": pid, "class": table["class"][pid],
                         "label": int(table["label"][pid]), "prompt": table["text"][pid],
                         "description": table["description"][pid], "seed": int(shard["seeds"][r]),
                         "teacher_confidence": round(float(shard["confidence"][r]), 6)})
    index = pd.DataFrame(rows)
    images = torch.cat(all_images)
    # Xuan et al.'s diversity, measured: per class, mean pairwise cosine distance of the images'
    # teacher features (the prompts stage reports the same for the prompts' text features).
    with torch.no_grad():
        feats = torch.cat([teacher.encode_image(images[i:i + 256].float().div(255).to(device)).cpu()
                           for i in range(0, len(images), 256)])
    metrics = {"image_diversity": diversity_report(feats, index["label"].tolist(), list(p.world.classes)),
               "teacher_confidence": round(float(index["teacher_confidence"].mean()), 4)}
    with atomic_dir(out) as tmp:
        index.to_csv(tmp / "index.csv", index=False)
        write_json(tmp / "metrics.json", metrics)
        preview_grid(images, index["label"].tolist(), len(p.world.classes)).save(tmp / "preview.png")
        finalize(work, tmp, [shard_name(i) for i in range(len(ranges))])
    remove_work_dir(work)
    dist.close()
    print(f"synthesize: {len(index)} images; mean teacher confidence {metrics['teacher_confidence']:.3f}, "
          f"image diversity {metrics['image_diversity']['mean']:.4f}")


if __name__ == "__main__":
    run_stage(main)
