"""Stage `generator`: materialise the VQGAN that synthesis decodes through.

generator.source=embedded trains a small VQGAN built from taming-transformers modules on the
world's train images (reconstruction + codebook losses only: nothing is downloaded);
generator.source=taming loads an official taming config + checkpoint from local paths.
Reports reconstruction PSNR on the world's test images and, for the embedded world, on its
validation split (metrics.json "val_psnr"). Training saves its state every
generator.checkpoint_every steps in artifacts/.generator.work/<key>/; a rerun after a kill resumes.
"""
import sys
from pathlib import Path

# This checkout's package first: an editable install of another clone must not run in its place.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import time
from dataclasses import asdict

import torch

from clipdistill.data import load_captioned_split, load_domain_folder, world_test_root
from clipdistill.formats import choose_format, loop_rate, step_flops, step_probe
from clipdistill.image_sets import decode_all
from clipdistill.live import LIVE_DIR, write_curves
from clipdistill.params import load_params
from clipdistill.preprocess import clip_default
from clipdistill.resumable import Checkpoints
from clipdistill.runtime import atomic_dir, run_stage, seed_everything, setup_torch, stage_args, write_json
from clipdistill.taming_release import load_taming_checkpoint
from clipdistill.vqgan import (VQGAN, embedded_vqgan_config, generator_lrs, reconstruction_psnr, save_checkpoint,
                               train_vqgan)

PSNR_IMAGES = 256


def main():
    args = stage_args(__doc__, "world", "out")
    params = load_params(args.params)
    device = setup_torch(params.device, params.threads)
    seed_everything(params.seed)
    size = params.world.image_size
    if params.generator.source == "embedded":
        cfg = embedded_vqgan_config(params.generator, size)
        model = VQGAN(cfg).to(device)
        world_train = Path(args.world) / "train"
        # The rendered world's train split: small by construction, trained on from RAM.
        images = decode_all(load_captioned_split(world_train, clip_default(size))[0], params.data.workers).images
        batch = images[:params.generator.batch_size].to(device).float().div(255).mul(2).sub(1)
        probe = step_probe({"model": model}, lambda model: model(batch)[0], device)
        fmt = choose_format("generator", params.precision, device, probe,
                            {"vqgan": asdict(cfg), "batch": params.generator.batch_size})
        print(fmt.describe("generator"))
        flops = step_flops(probe, fmt)
        checkpoints = Checkpoints.for_stage(
            args.out, {"generator": asdict(params.generator), "seed": params.seed, "threads": params.threads,
                       "device": params.device, "image_size": size, "format": fmt.name}, [world_train],
            params.generator.checkpoint_every)
        start = time.perf_counter()
        losses = train_vqgan(fmt.apply(model), images.to(device), steps=params.generator.steps,
                             batch_size=params.generator.batch_size, lr=params.generator.lr, seed=params.seed,
                             checkpoints=checkpoints, schedule=params.generator.schedule, amp_dtype=fmt.amp_dtype)
        print(loop_rate("generator", flops, len(losses), time.perf_counter() - start))
        summary = {"source": "embedded", "final_loss": sum(losses[-50:]) / len(losses[-50:]), "format": fmt.name}
        curves = {"loss": losses, "lr": generator_lrs(params.generator)}
    else:
        model = load_taming_checkpoint(params.generator.taming_config, params.generator.taming_checkpoint).to(device)
        cfg = model.cfg
        summary = {"source": "taming", "config": params.generator.taming_config,
                   "checkpoint": params.generator.taming_checkpoint}
        curves = {"loss": [], "lr": []}  # an official release: nothing trained here
    summary["psnr"] = domain_psnr(model, world_test_root(params, args.world), params.world.eval_domains, params, device)
    if params.world.source == "embedded" and params.world.val_styles:
        # The validation split (train-only styles): what the generator's length and rate are chosen on.
        summary["val_psnr"] = domain_psnr(model, Path(args.world) / "val", params.world.val_styles, params, device)
    with atomic_dir(args.out) as tmp:
        save_checkpoint(model.cpu(), cfg, tmp / "vqgan.pt")
        write_json(tmp / "metrics.json", summary)
        write_curves(tmp / LIVE_DIR, curves)
    if params.generator.source == "embedded":
        checkpoints.clear()
    print(f"generator: reconstruction PSNR {summary['psnr']} dB"
          + (f", validation {summary['val_psnr']['mean']} dB" if "val_psnr" in summary else ""))


def domain_psnr(model, root: Path, domains: list[str], params, device: torch.device) -> dict[str, float]:
    """Reconstruction PSNR (dB) per domain folder under `root`, and their mean. At most PSNR_IMAGES
    evenly spaced images per domain (a real dataset has thousands), decoded with CLIP's
    shortest-side resize and centre crop, as the teacher sees them."""
    size = params.world.image_size
    sets = load_domain_folder(root, list(params.world.classes), clip_default(size), domains)
    batch = max(1, 256 * 32 * 32 // (size * size))  # 256 images at 32 px, 5 at 224 px
    psnr = {}
    for dom, imgs in sets.items():
        picked = imgs.subset(torch.arange(0, len(imgs), max(1, len(imgs) // PSNR_IMAGES))[:PSNR_IMAGES])
        images = decode_all(picked, params.data.workers).images
        psnr[dom] = round(reconstruction_psnr(model, images.float().div(255).to(device), batch), 2)
    psnr["mean"] = round(sum(psnr.values()) / len(psnr), 2)
    return psnr


if __name__ == "__main__":
    run_stage(main)
