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

from dataclasses import asdict

from clipdistill.clip_models import materialise_clip, save_teacher
from clipdistill.params import load_params
from clipdistill.resumable import Checkpoints
from clipdistill.runtime import PipelineError, atomic_dir, run_stage, seed_everything, setup_torch, stage_args, write_json


def main():
    args = stage_args(__doc__, "world", "out", optional={"section": "teacher"})
    if args.section not in ("teacher", "student_clip"):
        raise PipelineError(f"--section must be teacher or student_clip, got {args.section!r}")
    p = load_params(args.params)
    device = setup_torch(p.device, p.threads)
    gen = seed_everything(p.seed)
    section = getattr(p, args.section)
    world_train = Path(args.world) / "train"
    checkpoints = Checkpoints.for_stage(
        args.out, {args.section: asdict(section), "seed": p.seed, "threads": p.threads, "device": p.device,
                   "image_size": p.world.image_size}, [world_train], section.checkpoint_every)
    model, summary = materialise_clip(section, world_train, p.world.image_size, gen, device, checkpoints)
    with atomic_dir(args.out) as tmp:
        save_teacher(model, tmp / "teacher.pt")
        write_json(tmp / "summary.json", summary)
    checkpoints.clear()
    print(f"{args.section}: {summary}")


if __name__ == "__main__":
    run_stage(main)
