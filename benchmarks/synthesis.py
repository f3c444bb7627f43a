"""Throughput of batched VQGAN-CLIP synthesis against the reference one-image-at-a-time loop.

Measures (images x optimisation steps) per second of `clipdistill.synthesis.synthesize_batch`
optimising B latents in one forward/backward pass per step, against the same function called
with B = 1 for each image in turn (what the reference VQGAN-CLIP notebooks do), at equal steps,
cutouts and image size. Weights are random: throughput does not depend on them.

  --setting embedded: the embedded default, built from params.yaml (teacher section: the small
      conv-tower CLIP at world.image_size; generator section: the small VQGAN).
  --setting real: open_clip ViT-B-32 (random weights, 224 px input) and a VQGAN with the shapes of
      taming's vqgan_imagenet_f16_16384, decoding --image-size px images.

Run from the repo root, e.g.
  python benchmarks/synthesis.py --setting embedded
  python benchmarks/synthesis.py --setting real --device cuda
  python benchmarks/synthesis.py --setting real --device cuda --precision bf16   # as the stage runs on CUDA
  python benchmarks/synthesis.py --setting embedded --batch 2 --steps 1   # smoke run
Each mode is timed --repeats times and the fastest run counts, and so is the ceiling's. The line
before the figure is the ceiling: a dense fp32 matmul's GFLOP/s on this machine over the loop's
achieved GFLOP/s, the most any batching can give at the same FLOPs. The last line is the figure: `batched/loop speedup: N.Nx`.

--precision auto (the default) picks the precision and memory format as the synthesize stage does
(clipdistill/formats.py: bf16 and channels-last on CUDA; on a CPU with native bf16 the fastest of
fp32/bf16 x NCHW/channels-last in a short probe, cached per machine; on other CPUs the faster of
fp32 NCHW and fp32 channels-last) and prints the choice. --precision bf16 runs decoding and the
teacher under bf16 autocast (latents, Adam and the loss stay fp32); fp32 runs without autocast.
The ceiling's matmul runs in the chosen precision, and the line before the figure gives the batched
step's share of that rate.
"""
from __future__ import annotations

import argparse
import os

# Pin the OpenMP threads unless the caller chose otherwise (read when torch loads). Unpinned, about
# half the processes on a 2-core AMD EPYC ran the one-image loop at ~95-110 images x steps / s instead of
# ~150; pinned, 2 in 11. The batched step did not change. The figure compares both at their best.
os.environ.setdefault("OMP_PROC_BIND", "close")
os.environ.setdefault("OMP_PLACES", "cores")

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from common import add_device_args, dense_matmul_gflops, machine_line, resolve_device, synchronize, timed

from clipdistill.clip_models import embedded_clip_from_params, fold_batchnorm, load_open_clip
from clipdistill.evaluation import count_parameters
from clipdistill.params import load_params
from clipdistill.formats import choose_format
from clipdistill.runtime import autocast, run_stage
from clipdistill.synthesis import image_seed, synthesis_probe, synthesize_batch
from clipdistill.vqgan import VQGAN, VQGANConfig, embedded_vqgan_config

# taming-transformers' configs/vqgan_imagenet_f16_16384.yaml (model.params and its ddconfig).
TAMING_F16_16384 = VQGANConfig(embed_dim=256, n_embed=16384, z_channels=256, resolution=256, ch=128,
                               ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0)
DEFAULTS = {  # per setting: batch, cutn, image size (None: from params.yaml's synthesize and world sections)
    "embedded": {"batch": None, "cutn": None, "image_size": None},
    "real": {"batch": 8, "cutn": 8, "image_size": 256},
}


def build_models(args, device):
    """(teacher, vqgan, image side in px, description), frozen and in eval mode on `device`."""
    torch.manual_seed(args.seed)  # the random weights
    if args.setting == "embedded":
        params = load_params(args.params)
        size = args.image_size or params.world.image_size
        teacher = embedded_clip_from_params(params.teacher, params.world.image_size)
        # As the generator stage builds it.
        cfg = embedded_vqgan_config(params.generator, params.world.image_size)
        what = f"embedded teacher ({params.teacher.vision} tower, width {params.teacher.vision_width}, " \
               f"{teacher.image_size} px), embedded VQGAN"
    else:
        size = args.image_size or DEFAULTS["real"]["image_size"]
        teacher = load_open_clip("ViT-B-32", "random")
        # The config keeps the official resolution: taming places attention by it, and the
        # convolutions decode any latent size, so smaller --image-size only shrinks the latents.
        cfg = TAMING_F16_16384
        what = f"open_clip ViT-B-32 (random weights, {teacher.image_size} px), VQGAN vqgan_imagenet_f16_16384 shapes"
    vqgan = VQGAN(cfg)
    f = vqgan.downsample_factor
    if size % f:
        raise SystemExit(f"--image-size {size} must be a multiple of the VQGAN's downsample factor {f}")
    what += f" (f{f}, {cfg.n_embed} codes, {count_parameters(vqgan.decoder) / 1e6:.1f} M decoder parameters)"
    teacher = fold_batchnorm(teacher.to(device).eval().requires_grad_(False))  # as the synthesize stage does
    vqgan = vqgan.to(device).eval().requires_grad_(False)
    return teacher, vqgan, size, what


def run(vqgan, teacher, targets, first_id: int, args, latent_hw, steps: int) -> torch.Tensor:
    """One synthesize_batch call on targets [b, D]; image i's init depends on (seed, first_id + i) only."""
    inits = [torch.Generator().manual_seed(image_seed(args.seed, first_id + i)) for i in range(len(targets))]
    step_gen = torch.Generator().manual_seed(image_seed(args.seed, first_id) ^ 0x5EED)
    return synthesize_batch(vqgan, teacher, targets, steps=steps, lr=0.1, cutn=args.cutn, cut_pow=1.0,
                            min_cut=0.5, augment=True, latent_hw=latent_hw, init_generators=inits,
                            generator=step_gen, amp_dtype=args.amp_dtype)


def choose_benchmark_format(args, device, vqgan, teacher, targets, size: int, latent_hw):
    """The precision and memory format for --precision, probed (and cached) as the synthesize stage does."""
    return choose_format("synthesis benchmark", args.precision, device,
                         synthesis_probe(vqgan, teacher, targets, lr=0.1, cutn=args.cutn, cut_pow=1.0, min_cut=0.5,
                                         augment=True, latent_hw=latent_hw),
                         {"setting": args.setting, "batch": args.batch, "cutn": args.cutn, "image_size": size,
                          "teacher": teacher.spec, "vqgan": str(vqgan.cfg)})


def flops_per_image_step(vqgan, teacher, targets, args, latent_hw) -> float:
    """Convolution and matmul FLOPs (forward + backward) of one optimisation step per image.

    The same in both modes (each image gets the same work); the difference of a 2-step and a
    1-step call leaves out the final decode. Norms and activations are not counted.
    """
    counts = []
    for steps in (1, 2):
        with FlopCounterMode(display=False) as counter:
            run(vqgan, teacher, targets, 0, args, latent_hw, steps)
        counts.append(counter.get_total_flops())
    return (counts[1] - counts[0]) / len(targets)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=tuple(DEFAULTS), default="embedded")
    parser.add_argument("--batch", type=int,
                        help="prompts per batched call (default: synthesize.batch_size embedded, 8 real)")
    parser.add_argument("--steps", type=int, default=5, help="optimisation steps per image, both ways")
    parser.add_argument("--cutn", type=int, help="cutouts per image per step (default: synthesize.cutn embedded, 8 real)")
    parser.add_argument("--image-size", type=int,
                        help="synthesised image side in px (default: world.image_size embedded, 256 real)")
    parser.add_argument("--params", default="params.yaml", help="params file (embedded setting)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each mode; the fastest counts (less noise from the rest of the machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: the synthesize stage's choice for this device (default); bf16: decoding and the "
                             "teacher under bf16 autocast; fp32: no autocast")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's table of 2 batched steps (where the time goes)")
    add_device_args(parser)
    args = parser.parse_args()
    defaults = DEFAULTS[args.setting]
    if args.setting == "embedded":  # the synthesize stage's own batch and cutouts
        synth = load_params(args.params).synthesize
        defaults = dict(defaults, batch=synth.batch_size, cutn=synth.cutn)
    for key in ("batch", "cutn"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if min(args.batch, args.steps, args.cutn, args.repeats) < 1:
        raise SystemExit("--batch, --steps, --cutn and --repeats must be >= 1")

    device = resolve_device(args)
    print(machine_line(device))
    teacher, vqgan, size, what = build_models(args, device)
    f = vqgan.downsample_factor
    latent_hw = (size // f, size // f)
    gen = torch.Generator().manual_seed(args.seed)
    targets = F.normalize(torch.randn(args.batch, teacher.embed_dim, generator=gen), dim=-1).to(device)
    fmt = choose_benchmark_format(args, device, vqgan, teacher, targets, size, latent_hw)
    args.amp_dtype = fmt.amp_dtype
    vqgan, teacher = fmt.apply(vqgan), fmt.apply(teacher)
    precision = "bf16" if fmt.amp_dtype is not None else "fp32"
    print(f"setting {args.setting}: {what}")
    print(f"{args.batch} images of {size} px (latents {latent_hw[0]}x{latent_hw[1]}), {args.steps} steps, "
          f"{args.cutn} cutouts of {teacher.image_size} px per image per step, on {device}")
    print(fmt.describe("format"))

    def batched():
        run(vqgan, teacher, targets, 0, args, latent_hw, args.steps)

    def loop():
        for i in range(args.batch):
            run(vqgan, teacher, targets[i:i + 1], i, args, latent_hw, args.steps)

    # Warm-up at both call shapes (allocator, kernel selection, lazy init), one step each.
    run(vqgan, teacher, targets, 0, args, latent_hw, 1)
    run(vqgan, teacher, targets[:1], 0, args, latent_hw, 1)
    synchronize(device)

    rows = []
    for name, fn, calls, per_call in (("batched", batched, 1, args.batch), ("loop", loop, args.batch, 1)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = min(timed(fn, device) for _ in range(args.repeats))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        rows.append((name, calls, per_call, seconds, args.batch * args.steps / seconds, peak))

    # Achieved conv/matmul GFLOP/s: how far from compute-bound each mode is on this machine.
    flops = flops_per_image_step(vqgan, teacher, targets, args, latent_hw)
    print(f"{flops / 1e6:.1f} MFLOP of convolutions and matmuls per image per step (forward + backward)")
    print(f"{'mode':<8} {'calls':>6} {'images/call':>12} {'seconds':>9} {'images*steps/s':>15} {'GFLOP/s':>8}"
          + (f" {'peak GiB':>9}" if device.type == "cuda" else ""))
    for name, calls, per_call, seconds, rate, peak in rows:
        print(f"{name:<8} {calls:>6} {per_call:>12} {seconds:>9.3f} {rate:>15.2f} {rate * flops / 1e9:>8.1f}"
              + (f" {peak:>9.2f}" if peak is not None else ""))
    # The ceiling of batching: the batched step cannot run its FLOPs faster than a large dense
    # matmul, so batched/loop can be at most (peak GFLOP/s) / (the loop's GFLOP/s) on this machine.
    with autocast(device, args.amp_dtype):  # bf16: the matmul runs in bf16, as the synthesis step's do
        peak = dense_matmul_gflops(device, trials=args.repeats)  # fastest of N, as the modes are
    loop_gflops = rows[1][4] * flops / 1e9
    print(f"dense {precision} matmul peak {peak:.1f} GFLOP/s: batched at that rate would be {peak / loop_gflops:.1f}x "
          f"the loop (the most batching can give here)")
    print(f"batched step: {rows[0][4] * flops / 1e9:.1f} GFLOP/s, {100 * rows[0][4] * flops / 1e9 / peak:.0f} % of the "
          f"dense {precision} matmul rate")
    if args.profile:
        with torch.profiler.profile() as prof:
            run(vqgan, teacher, targets, 0, args, latent_hw, 2)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print(f"batched/loop speedup: {rows[0][4] / rows[1][4]:.1f}x")


if __name__ == "__main__":
    run_stage(main)  # a user error (no GPU for --device cuda, bad params) is one line, exit 1
