"""What two changes buy the embedded CLIPs' training step (clip_training.py, runtime.py).

Times `train_clip` steps of the teacher and of the smaller CLIP (`teacher.*`, `student_clip.*` in
--params), each in the format its stage chooses on this machine, in three variants taking turns:

  as run        the pipeline's code: AdamW over the token rows the captions use, new tensors unfilled
  whole table   AdamW over all 49,408 rows of the tokenizer's table (caption_vocabulary undone)
  NaN-filled    torch's deterministic mode filling each new tensor with NaN, its default
                (clipdistill/runtime.py setup_torch turns it off)

All three end in the same weights bit for bit (tests/test_clip_training.py, and a full `dvc repro`
for the fill); only the time differs. Images are random, captions the world's (`world.caption` over
its classes and training styles). The fastest round of each variant counts. The last line is the
figure, e.g. `speed-up over whole table, NaN-filled: teacher 1.06x, 1.10x; student_clip 1.15x, 1.05x`.

  python benchmarks/clip_step.py
  python benchmarks/clip_step.py --steps 2 --rounds 1 --batch 8   # smoke run
"""
from __future__ import annotations

import argparse
import contextlib
from unittest import mock

import numpy as np
import torch
from common import add_device_args, add_variant_args, filled_empties, machine_line, resolve_device, timed

from clipdistill import clip_training
from clipdistill.clip_models import embedded_clip_from_params
from clipdistill.clip_training import clip_probe, format_signature, train_clip
from clipdistill.formats import choose_format
from clipdistill.params import load_params
from clipdistill.runtime import run_stage
from clipdistill.world import caption

SECTIONS = ("teacher", "student_clip")
VARIANTS = ("as run", "whole table", "NaN-filled")


def whole_table(model, tokens):
    """caption_vocabulary undone: the loop trains every row of the token table."""
    return contextlib.nullcontext(tokens)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("embedded",), default="embedded",
                        help="the embedded CLIPs only: an open_clip teacher is loaded, not trained")
    parser.add_argument("--batch", type=int, help="images per step (default: each section's batch_size)")
    add_variant_args(parser, steps=10, steps_help="training steps per timed call", rounds=3)
    add_device_args(parser)
    args = parser.parse_args()
    if min(args.steps, args.rounds, args.batch or 1) < 1:
        raise SystemExit("--batch, --steps and --rounds must be >= 1")
    params = load_params(args.params)
    device = resolve_device(args)
    print(machine_line(device))
    size = params.world.image_size
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    results = {}
    for name in SECTIONS:
        section = getattr(params, name)
        batch = args.batch or section.batch_size
        n = batch * args.steps
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
        styles = params.world.train_styles
        captions = [caption(params.world.classes[i % len(params.world.classes)], styles[i % len(styles)], rng)
                    for i in range(n)]
        torch.manual_seed(args.seed)
        model = embedded_clip_from_params(section, size)
        # The stage's probe and cache key, so the format is the one `dvc repro` runs in here; another
        # --batch gets a key of its own, so it never answers for the stage.
        signature = format_signature(name, section, size)
        if batch != section.batch_size:
            signature["benchmark batch"] = batch
        fmt = choose_format(name, params.precision, device, clip_probe(model, images, captions, batch, device),
                            signature)
        print(fmt.describe(name))

        def prepared(variant):
            """One train_clip call of `steps` steps on a fresh model, built before the clock starts."""
            clip = fmt.apply(embedded_clip_from_params(section, size))
            table = whole_table if variant == "whole table" else clip_training.caption_vocabulary

            def run():
                with mock.patch.object(clip_training, "caption_vocabulary", table), \
                        filled_empties(variant == "NaN-filled"):
                    train_clip(clip, images, captions, epochs=1, batch_size=batch, lr=section.lr,
                               weight_decay=section.weight_decay,
                               generator=torch.Generator().manual_seed(args.seed), device=device,
                               desc=f"{name} ({variant})", amp_dtype=fmt.amp_dtype)
            return run

        times = {variant: [] for variant in VARIANTS}
        for variant in times:  # warm-up
            prepared(variant)()
        for _ in range(args.rounds):
            for variant in times:
                times[variant].append(timed(prepared(variant), device) / args.steps)
        for variant, ts in times.items():
            print(f"{name} {variant}: fastest {min(ts) * 1e3:.1f} ms/step over {args.rounds} rounds of "
                  f"{args.steps} steps of {batch} images")
        results[name] = [min(times[variant]) / min(times["as run"]) for variant in VARIANTS[1:]]
    print(f"speed-up over {', '.join(VARIANTS[1:])}: "
          + "; ".join(f"{name} " + ", ".join(f"{x:.2f}x" for x in speedups) for name, speedups in results.items()))


if __name__ == "__main__":
    run_stage(main)
