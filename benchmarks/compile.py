"""Would `torch.compile` pay for itself inside the generator stage? Eager against compiled.

The generator stage's loop is the default's longest (about half of `dvc repro` on a 2-core CPU).
This times its training step (encoder, codebook, decoder, L1 + MSE + codebook loss, backward,
Adam) at the params' batch size, in the format the stage chose (clipdistill/formats.py), three ways:

  eager                  what the stage runs
  compile, first steps   torch.compile's one-time cost: tracing, inductor's C++ build, autotuning
  compiled               the steady state after it

and prints what compiling would save over the stage's `generator.steps`:
`steps x (eager - compiled) - compile cost`. A negative figure means compiling costs time.

Inductor's CPU backend builds C++ at run time, so it needs a compiler (g++ or clang++; $CXX).
Without one this prints that it found none and times the eager step only: the pipeline itself
never compiles, so it needs no toolchain.

  python benchmarks/compile.py                 # the default's generator step
  python benchmarks/compile.py --steps 5       # fewer timed steps (smoke run)

The last line is the figure: `compile over <N> generator steps: saves S s` (or `costs S s`).
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from common import add_device_args, machine_line, resolve_device

from clipdistill.formats import choose_format, step_probe
from clipdistill.params import load_params
from clipdistill.runtime import autocast, run_stage
from clipdistill.vqgan import VQGAN, embedded_vqgan_config


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would build with, or None when this machine has none."""
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def training_step(encode, decode, quantize, opt: torch.optim.Optimizer, x: torch.Tensor, amp_dtype, device):
    """One step of clipdistill.vqgan.train_vqgan's loop on batch x, without its sampling and code restarts."""
    def step():
        with autocast(device, amp_dtype):
            z = encode(x)
        zq, qloss, _ = quantize(z.float())
        with autocast(device, amp_dtype):
            rec = decode(zq)
        rec = rec.float()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + qloss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def seconds_per_step(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode, after warm-up")
    add_device_args(parser)
    args = parser.parse_args()
    params = load_params(args.params)
    if args.threads == 0:
        args.threads = params.threads
    device = resolve_device(args)
    print(machine_line(device))
    torch.manual_seed(0)
    cfg = embedded_vqgan_config(params.generator, params.world.image_size)
    batch = params.generator.batch_size
    model = VQGAN(cfg).to(device)
    x = torch.rand(batch, 3, cfg.resolution, cfg.resolution, device=device).mul(2).sub(1)
    probe = step_probe({"model": model}, lambda model: model(x)[0], device)
    fmt = choose_format("generator", params.precision, device, probe, {"vqgan": asdict(cfg), "batch": batch})
    print(f"format: {fmt.name} (as the generator stage chooses it)")
    fmt.apply(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9))  # as train_vqgan's

    eager = training_step(model.encode_continuous, model.decode, model.vector_quantize, opt, x, fmt.amp_dtype, device)
    for _ in range(3):
        eager()
    eager_s = seconds_per_step(eager, args.steps)
    print(f"eager: {eager_s * 1e3:.1f} ms per step")

    compiler = cxx_compiler()
    if compiler is None:
        print("compile: no C++ compiler found (g++, clang++ or $CXX), so inductor cannot build; eager only")
        return
    print(f"compile: inductor builds with {compiler}")
    encode = torch.compile(model.encode_continuous)
    decode = torch.compile(model.decode)
    compiled = training_step(encode, decode, model.vector_quantize, opt, x, fmt.amp_dtype, device)
    start = time.perf_counter()
    for _ in range(3):  # tracing and the C++ build happen on the first call; the next two settle
        compiled()
    first_s = time.perf_counter() - start
    compiled_s = seconds_per_step(compiled, args.steps)
    cost = first_s - 3 * compiled_s
    print(f"compiled: {compiled_s * 1e3:.1f} ms per step ({eager_s / compiled_s:.2f}x eager), "
          f"after a one-time {cost:.1f} s")
    stage_steps = params.generator.steps
    saved = stage_steps * (eager_s - compiled_s) - cost
    print(f"compile over {stage_steps} generator steps: {'saves' if saved >= 0 else 'costs'} {abs(saved):.0f} s")


if __name__ == "__main__":
    run_stage(main)
