"""Stage `teacher` (and `student_clip`): materialise a CLIP the other stages load.

source=embedded trains the small open_clip CLIP on the world's captioned train split;
source=open_clip loads an open_clip architecture with a pretrained tag or local file.
`--section student_clip` materialises the smaller CLIP the prompt students start from.
"""
from pathlib import Path

from clipdistill.clip_models import materialise_clip, save_teacher
from clipdistill.params import load_params
from clipdistill.runtime import PipelineError, atomic_dir, run_stage, seed_everything, setup_torch, stage_args, write_json


def main():
    args = stage_args(__doc__, "world", "out", optional={"section": "teacher"})
    if args.section not in ("teacher", "student_clip"):
        raise PipelineError(f"--section must be teacher or student_clip, got {args.section!r}")
    p = load_params(args.params)
    device = setup_torch(p.device, p.threads)
    gen = seed_everything(p.seed)
    model, summary = materialise_clip(getattr(p, args.section), Path(args.world) / "train", p.world.image_size,
                                      gen, device)
    with atomic_dir(args.out) as tmp:
        save_teacher(model, tmp / "teacher.pt")
        write_json(tmp / "summary.json", summary)
    print(f"{args.section}: {summary}")


if __name__ == "__main__":
    run_stage(main)
