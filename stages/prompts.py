"""Stage `prompts`: class names -> prompts and their teacher text features (prompts.method)."""
import sys
from pathlib import Path

# This checkout's package first: an editable install of another clone must not run in its place.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipdistill.clip_models import load_clip
from clipdistill.diversity import diversity_report
from clipdistill.params import load_params
from clipdistill.prompts import build_method, save_prompts
from clipdistill.runtime import atomic_dir, run_stage, seed_everything, setup_torch, stage_args, write_json


def main():
    args = stage_args(__doc__, "teacher", "out")
    params = load_params(args.params)
    device = setup_torch(params.device, params.threads)
    gen = seed_everything(params.seed)
    method = build_method(params.prompts)  # before loading the teacher: a bad style dictionary fails first
    teacher = load_clip(args.teacher, device)
    prompts = method.generate(teacher, params.world.classes, params.prompts.per_class, gen)
    diversity = diversity_report(prompts.features, prompts.labels, params.world.classes)
    with atomic_dir(args.out) as tmp:
        save_prompts(prompts, tmp)
        write_json(tmp / "metrics.json", {"prompt_diversity": diversity})
    print(f"prompts: {len(prompts.texts)} {prompts.method} prompts for {len(params.world.classes)} classes, "
          f"mean pairwise cosine distance {diversity['mean']:.4f}")


if __name__ == "__main__":
    run_stage(main)
