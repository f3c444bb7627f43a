"""What every benchmark script shares: the device choice, the line naming the machine, and timing.

Figures are only comparable on the same machine, so each script prints `machine_line` first and
the figure is recorded with it.
"""
from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from pathlib import Path

import torch

# This checkout's package first (as the stage scripts do): another clone's editable install must
# not be what a benchmark measures. Every benchmark imports this module before clipdistill.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipdistill.runtime import setup_torch


def add_device_args(parser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                        help="where to run (auto: cuda when torch sees a GPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0 = torch's default)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's allocator defaults instead of the stages' retain_freed_memory policy")


def add_variant_args(parser, *, steps: int, steps_help: str, rounds: int) -> None:
    """--params, --steps, --rounds and --seed of a script that times variants of one loop in turns."""
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--rounds", type=int, default=rounds, help="timed calls of each variant, interleaved")
    parser.add_argument("--seed", type=int, default=0)


def resolve_device(args) -> torch.device:
    """The pipeline's own device setup (clipdistill.runtime.setup_torch), so figures match its runs."""
    return setup_torch(args.device, args.threads, retain_memory=not args.default_malloc)


def machine_line(device: torch.device) -> str:
    """One line naming the hardware and software a figure was taken on."""
    cpu = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), " \
          f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"machine: {props.name} ({props.total_memory / 2**30:.0f} GiB), {cpu}"
    return f"machine: cpu only, {cpu}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dense_matmul_gflops(device: torch.device, n: int = 2048, reps: int = 10, budget_s: float = 10.0,
                        trials: int = 1) -> float:
    """GFLOP/s of a square [size, size] @ [size, size] matmul on `device` (in the autocast dtype the
    caller has set): about the most this machine computes, a ceiling for any mode of a benchmark
    whose work is counted in FLOPs (no batching beats it). The fastest of `trials` timings counts,
    as a benchmark that takes its fastest of N runs should compare it with the ceiling's fastest.

    `size` is the largest of 256, 512, ... up to `n` whose `reps` products fit in about `budget_s`.
    Where the dtype has no hardware support (bf16 on a CPU without AVX512-BF16 or AMX: one 2048
    product took 59 s on a 2-core AMD EPYC without AVX-512), the ceiling is then measured at a
    smaller size in seconds, instead of n = 2048 in minutes; such a rate is far below fp32's anyway.
    """
    size = 256
    while True:
        a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
        for _ in range(2):  # warm-up: kernel selection, allocator
            a @ b
        one = timed(lambda: a @ b, device)
        if size >= n or 8 * one * reps > budget_s:  # the next size costs about 8x
            break
        size *= 2
    seconds = min(timed(lambda: [a @ b for _ in range(reps)], device) for _ in range(trials))
    return 2 * size**3 * reps / seconds / 1e9


@contextlib.contextmanager
def filled_empties(on: bool):
    """Within the block, torch's deterministic mode fills each new tensor with NaN (its default) or
    not (what clipdistill.runtime.setup_torch sets): for benchmarks that time the fill's cost."""
    saved = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = on
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = saved


def timed(fn, device: torch.device) -> float:
    """Wall-clock seconds of `fn()`, with queued GPU work finished before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start
