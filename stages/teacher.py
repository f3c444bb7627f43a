"""Stage `teacher` (and `student_clip`): materialise a CLIP the other stages load.

source=embedded trains the small open_clip CLIP on the world's captioned train split;
source=open_clip loads an open_clip architecture with a pretrained tag or local file.
`--section student_clip` materialises the smaller CLIP the prompt students start from.
Training saves its state every <section>.checkpoint_every steps in <out>'s work folder
(artifacts/.<out name>.work/<key>/); a rerun after a kill resumes from there.
"""
import sys
from pathlib import Path

# This checkout's package first: an editable install of another clone must not run in its place.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import time
from dataclasses import asdict

from clipdistill.clip_models import CLIP_FILE, embedded_clip_from_params, load_open_clip, save_clip
from clipdistill.clip_training import (TRAINING_STATE_VERSION, clip_lr_factor, clip_probe, format_signature,
                                       train_clip)
from clipdistill.data import load_captioned_split
from clipdistill.formats import choose_format, loop_rate, step_flops
from clipdistill.image_sets import fit_in_memory
from clipdistill.live import LIVE_DIR, scheduled_lrs, write_curves
from clipdistill.params import load_params
from clipdistill.resumable import Checkpoints
from clipdistill.runtime import (PipelineError, atomic_dir, run_stage, seed_everything, setup_torch, stage_args,
                                 write_json)

SECTIONS = ("teacher", "student_clip")  # the params sections this stage materialises (--section)


def main():
    args = stage_args(__doc__, "world", "out", optional={"section": "teacher"})
    if args.section not in SECTIONS:
        raise PipelineError(f"--section must be {' or '.join(SECTIONS)}, got {args.section!r}")
    params = load_params(args.params)
    device = setup_torch(params.device, params.threads)
    generator = seed_everything(params.seed)
    section = getattr(params, args.section)  # params.teacher or params.student_clip
    image_size = params.world.image_size
    summary = {"source": section.source}
    checkpoints, curves = None, None
    if section.source == "embedded":
        world_train = Path(args.world) / "train"
        model = embedded_clip_from_params(section, image_size)
        images, captions, _ = load_captioned_split(world_train, model.prep)
        images = fit_in_memory(images, params.data.memory_budget_mb, params.data.workers, args.section)
        probe = clip_probe(model, images, captions, section.batch_size, device)
        fmt = choose_format(args.section, params.precision, device, probe,
                            format_signature(args.section, section, image_size))
        print(fmt.describe(args.section))
        flops = step_flops(probe, fmt)
        checkpoints = Checkpoints.for_stage(
            args.out, {args.section: asdict(section), "seed": params.seed, "threads": params.threads,
                       "device": params.device, "image_size": image_size, "format": fmt.name,
                       "state_version": TRAINING_STATE_VERSION}, [world_train],
            section.checkpoint_every)
        start = time.perf_counter()
        losses = train_clip(fmt.apply(model), images, captions, epochs=section.epochs, batch_size=section.batch_size,
                            lr=section.lr, weight_decay=section.weight_decay, generator=generator, device=device,
                            checkpoints=checkpoints, desc=args.section, workers=params.data.workers,
                            amp_dtype=fmt.amp_dtype)
        print(loop_rate(args.section, flops, len(losses), time.perf_counter() - start))
        summary.update(final_loss=sum(losses[-20:]) / len(losses[-20:]), steps=len(losses),
                       logit_scale=model.logit_scale, format=fmt.name)
        curves = {"loss": losses, "lr": scheduled_lrs(section.lr, clip_lr_factor(len(losses)), len(losses))}
    else:
        model = load_open_clip(section.open_clip_model, section.pretrained)
        summary.update(model=section.open_clip_model, pretrained=section.pretrained)
    with atomic_dir(args.out) as tmp:
        save_clip(model.cpu(), tmp / CLIP_FILE)
        write_json(tmp / "summary.json", summary)
        if curves is not None:  # a trained CLIP: its training curves (an open_clip one has none)
            write_curves(tmp / LIVE_DIR, curves)
    if checkpoints is not None:
        checkpoints.clear()
    print(f"{args.section}: {summary}")


if __name__ == "__main__":
    run_stage(main)
