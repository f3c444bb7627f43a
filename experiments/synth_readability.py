"""How the teacher and the smaller CLIP read a folder of synthesized images.

    python experiments/synth_readability.py [artifacts/synth]

Prints, for the synthesized images (label = the class of the prompt each came from) and for the
world's train images, how often each model's zero-shot prediction names that class and how often
the two models agree. The "small CLIP reads" column of docs/results.md is the smaller CLIP's figure.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from clipdistill.clip_models import load_teacher
from clipdistill.data import load_shards, load_unlabeled_folder
from clipdistill.params import load_params
from clipdistill.runtime import setup_torch
from clipdistill.text import class_vectors, load_class_vectors


@torch.no_grad()
def predictions(model, vectors: torch.Tensor, images: torch.Tensor, device, batch: int = 256) -> torch.Tensor:
    return torch.cat([model.logits(images[i:i + batch].to(device).float().div(255), vectors).argmax(1).cpu()
                      for i in range(0, len(images), batch)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("synth", nargs="?", default="artifacts/synth")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--artifacts", default="artifacts")
    args = ap.parse_args()
    p = load_params(args.params)
    device = setup_torch(p.device, p.threads)
    art = Path(args.artifacts)
    classes = list(p.world.classes)
    teacher, small = load_teacher(art / "teacher", device), load_teacher(art / "student_clip", device)
    t_vec = load_class_vectors(art / "text_features")["features"].to(device)
    s_vec = class_vectors(small, classes, p.text_features.templates).to(device)
    images, index = load_shards(args.synth)
    sets = {"synthesized": (images, torch.tensor(index["label"].to_numpy())),
            "world train": load_unlabeled_folder(art / "world" / "train", classes, p.world.image_size)}
    for name, (x, y) in sets.items():
        t, s = predictions(teacher, t_vec, x, device), predictions(small, s_vec, x, device)
        print(f"{name} ({len(x)} images): teacher reads {(t == y).float().mean():.3f}, "
              f"small CLIP reads {(s == y).float().mean():.3f}, agree {(t == s).float().mean():.3f}")


if __name__ == "__main__":
    main()
