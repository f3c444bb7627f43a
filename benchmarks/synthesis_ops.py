"""What each of the synthesis step's CPU-side speed-ups buys: the step with each one undone.

Times the batched synthesis step of `benchmarks/synthesis.py` (the embedded setting: the
synthesize stage's batch, cutouts and models, random weights) in the format the stage chooses on
this machine, in four variants run in turn within one process, `--rounds` times each:

  as run          the pipeline's code
  torch GroupNorm the VQGAN's GroupNorms back to torch's kernel (clipdistill/group_norm.py undone)
  x*sigmoid(x)    taming's own swish instead of F.silu (clipdistill/vqgan.py)
  ReLU then pool  the teacher tower's ReLU before its max-pool (the VGG order; clip_models.py)
  NaN-filled      torch's deterministic mode filling each new tensor with NaN, as it does by default
                  (clipdistill/runtime.py setup_torch turns it off)

Then GroupNorm forward + backward alone at the decoder's shapes: torch's kernel in NCHW and in
channels-last against clipdistill's in channels-last. Interleaving the variants spreads the
machine's drift over all of them; the fastest round of each counts and the median is printed
beside it. The last line is the figure: the step's speed-up over each variant, e.g.
`speed-up over torch GroupNorm, x*sigmoid(x), ReLU then pool, NaN-filled: 1.12x, 1.10x, 1.04x, 1.10x`.

  python benchmarks/synthesis_ops.py
  python benchmarks/synthesis_ops.py --rounds 2 --steps 1 --batch 2   # smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics

os.environ.setdefault("OMP_PROC_BIND", "close")  # as benchmarks/synthesis.py
os.environ.setdefault("OMP_PLACES", "cores")

import torch
import torch.nn.functional as F
from torch import nn
from common import add_device_args, add_variant_args, filled_empties, machine_line, resolve_device, timed

import taming.modules.diffusionmodules.model as taming_model
from clipdistill.group_norm import GroupNorm
from clipdistill.params import load_params
from clipdistill.runtime import run_stage
from synthesis import build_models, choose_benchmark_format, run


def taming_swish(x):
    return x * torch.sigmoid(x)  # taming.modules.diffusionmodules.model.nonlinearity as released


@contextlib.contextmanager
def swish(fn):
    """taming's blocks call the module-level `nonlinearity` at run time: swap it for the block."""
    saved = taming_model.nonlinearity
    taming_model.nonlinearity = fn
    try:
        yield
    finally:
        taming_model.nonlinearity = saved


def torch_group_norm(vqgan: nn.Module) -> nn.Module:
    for m in vqgan.modules():
        if type(m) is GroupNorm:
            m.__class__ = nn.GroupNorm
    return vqgan


def relu_before_pool(teacher: nn.Module) -> nn.Module:
    layers = list(teacher.model.visual.features)
    for i, layer in enumerate(layers[:-1]):
        if isinstance(layer, nn.MaxPool2d) and isinstance(layers[i + 1], nn.ReLU):
            layers[i], layers[i + 1] = layers[i + 1], layer
    teacher.model.visual.features = nn.Sequential(*layers)
    return teacher


def group_norm_rows(vqgan, device, batch: int, rounds: int) -> list[str]:
    """Forward + backward of each distinct decoder GroupNorm shape, in ms: torch NCHW / torch CL / ours CL."""
    rows = []
    shapes = sorted({(m.num_groups, m.num_channels) for m in vqgan.decoder.modules() if isinstance(m, nn.GroupNorm)})
    side = vqgan.cfg.resolution
    for groups, channels in shapes:
        for s in sorted({side // 2**i for i in range(len(vqgan.cfg.ch_mult))}, reverse=True):
            x = torch.randn(batch, channels, s, s, device=device)
            dy = torch.randn_like(x)
            cells = []
            for cls, fmt in ((nn.GroupNorm, torch.contiguous_format), (nn.GroupNorm, torch.channels_last),
                             (GroupNorm, torch.channels_last)):
                norm = cls(groups, channels, eps=1e-6).to(device)
                xi = x.contiguous(memory_format=fmt).requires_grad_(True)
                gi = dy.contiguous(memory_format=fmt)
                step = lambda: norm(xi).backward(gi)  # noqa: E731
                step()
                cells.append(min(timed(step, device) for _ in range(max(3, rounds))) * 1e3)
            rows.append(f"GroupNorm({groups}, {channels}) on [{batch}, {channels}, {s}, {s}]: torch NCHW "
                        f"{cells[0]:.2f} ms, torch channels-last {cells[1]:.2f} ms, ours channels-last {cells[2]:.2f} ms")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("embedded",), default="embedded")
    parser.add_argument("--batch", type=int, help="prompts per step (default: synthesize.batch_size)")
    parser.add_argument("--cutn", type=int, help="cutouts per image (default: synthesize.cutn)")
    add_variant_args(parser, steps=5, steps_help="optimisation steps per timed call", rounds=5)
    add_device_args(parser)
    args = parser.parse_args()
    synth = load_params(args.params).synthesize
    args.batch, args.cutn = args.batch or synth.batch_size, args.cutn or synth.cutn
    args.image_size, args.precision = None, "auto"
    if min(args.batch, args.cutn, args.steps, args.rounds) < 1:
        raise SystemExit("--batch, --cutn, --steps and --rounds must be >= 1")
    device = resolve_device(args)
    print(machine_line(device))
    teacher, vqgan, size, _ = build_models(args, device)
    latent_hw = (size // vqgan.downsample_factor,) * 2
    gen = torch.Generator().manual_seed(args.seed)
    targets = F.normalize(torch.randn(args.batch, teacher.embed_dim, generator=gen), dim=-1).to(device)
    fmt = choose_benchmark_format(args, device, vqgan, teacher, targets, size, latent_hw)
    args.amp_dtype = fmt.amp_dtype
    print(fmt.describe("format"))
    print(f"{args.batch} images, {args.cutn} cutouts each, {args.steps} steps per call, {args.rounds} rounds")

    def variant(vq, te, act, nan_filled=False):
        vq, te = fmt.apply(vq), fmt.apply(te)

        def call():
            with swish(act), filled_empties(nan_filled):
                run(vq, te, targets, 0, args, latent_hw, args.steps)
        return call

    variants = {
        "as run": variant(vqgan, teacher, F.silu),
        "torch GroupNorm": variant(torch_group_norm(copy.deepcopy(vqgan)), teacher, F.silu),
        "x*sigmoid(x)": variant(vqgan, teacher, taming_swish),
        "ReLU then pool": variant(vqgan, relu_before_pool(copy.deepcopy(teacher)), F.silu),
        "NaN-filled": variant(vqgan, teacher, F.silu, nan_filled=True),
    }
    times = {name: [] for name in variants}
    for call in variants.values():  # warm-up
        call()
    for _ in range(args.rounds):
        for name, call in variants.items():
            times[name].append(timed(call, device) / args.steps)
    print(f"{'variant':<16} {'fastest ms/step':>16} {'median ms/step':>15}")
    for name, ts in times.items():
        print(f"{name:<16} {min(ts) * 1e3:>16.1f} {statistics.median(ts) * 1e3:>15.1f}")
    for row in group_norm_rows(vqgan, device, args.batch, args.rounds):
        print(row)
    base = min(times["as run"])
    print("speed-up over torch GroupNorm, x*sigmoid(x), ReLU then pool, NaN-filled: "
          + ", ".join(f"{min(times[n]) / base:.2f}x" for n in list(variants)[1:]))


if __name__ == "__main__":
    run_stage(main)
