"""Stage `text_features`: the teacher's class vectors, computed once (PromptKD's pre-storage).

Each class vector is the normalised mean of the teacher's text features over the template
ensemble; teacher and student both classify against exactly these stored vectors.
"""
import sys
from pathlib import Path

# This checkout's package first: an editable install of another clone must not run in its place.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from clipdistill.clip_models import load_clip
from clipdistill.params import load_params
from clipdistill.runtime import atomic_dir, run_stage, setup_torch, stage_args
from clipdistill.text import class_vectors


def main():
    args = stage_args(__doc__, "teacher", "out")
    params = load_params(args.params)
    device = setup_torch(params.device, params.threads)
    teacher = load_clip(args.teacher, device)
    feats = class_vectors(teacher, params.world.classes, params.text_features.templates)
    with atomic_dir(args.out) as tmp:
        torch.save({"classes": list(params.world.classes), "templates": list(params.text_features.templates),
                    "features": feats.cpu(), "logit_scale": teacher.logit_scale}, tmp / "class_vectors.pt")
    print(f"text_features: {feats.shape[0]} classes x {feats.shape[1]} dims")


if __name__ == "__main__":
    run_stage(main)
