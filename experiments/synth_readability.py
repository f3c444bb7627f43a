"""How the teacher and the smaller CLIP read a folder of synthesized images.

    python experiments/synth_readability.py [artifacts/synth]

Prints, for the synthesized images (label = the class of the prompt each came from) and for the
world's train images, how often each model's zero-shot prediction names that class and how often
the two models agree. The "small CLIP reads" column of docs/results.md is the smaller CLIP's figure.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from clipdistill.clip_models import decoding, load_clip
from clipdistill.data import load_shards, load_unlabeled
from clipdistill.params import load_params
from clipdistill.runtime import setup_torch
from clipdistill.text import class_vectors, load_class_vectors
from clipdistill.training import predict


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
    teacher, small = load_clip(art / "teacher", device), load_clip(art / "student_clip", device)
    t_vec = load_class_vectors(art / "text_features")["features"].to(device)
    s_vec = class_vectors(small, classes, p.text_features.templates).to(device)
    sets = {"synthesized": load_shards(args.synth, p.world.image_size)[0],
            "world train": load_unlabeled(art / "world" / "train", classes, decoding(teacher, p.world.image_size))}
    for name, x in sets.items():
        y = x.labels
        t = predict(lambda b: teacher.logits(b, t_vec), x, 256, device, p.data.workers)
        s = predict(lambda b: small.logits(b, s_vec), x, 256, device, p.data.workers)
        print(f"{name} ({len(x)} images): teacher reads {(t == y).float().mean():.3f}, "
              f"small CLIP reads {(s == y).float().mean():.3f}, agree {(t == s).float().mean():.3f}")


if __name__ == "__main__":
    main()
