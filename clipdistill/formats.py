"""Which precision and memory format each training loop runs in: the fastest the device has.

`precision: auto` means bf16 autocast and channels-last on CUDA. On a CPU it depends on the processor.
Where the CPU has native bf16 (AVX512-BF16 or AMX), bf16 can be 1.6x faster or 1.4x slower for the
same loop. The choice is also loop by loop: on a 2-core AMD EPYC, bf16 speeds up VQGAN training and
slows down synthesis (docs/results.md, "Precision per loop"). So `choose_format` times a few steps
of the loop itself in every candidate format and keeps the fastest. A candidate must beat the
choice before it (fp32 NCHW, then fp32 channels-last, bf16 NCHW, bf16 channels-last) by `MARGIN`,
so timing noise never swaps in a format that is not clearly faster. A CPU without native bf16
(bf16 there is emulated: a 2048 matmul ran at 0.3 GFLOP/s against fp32's 105 on a 2-core AMD EPYC
without AVX-512, docs/results.md "Machines")
is probed over the two fp32 formats only.

The probe's answer is stored per machine in `cache_path()`, keyed by the loop, its shapes, the CPU,
torch and the thread count. The same machine and params therefore always pick the same format and
write the same artifacts; delete the file to probe again. On a CPU without native bf16 a loop
keeps fp32 NCHW unless channels-last is `MARGIN` faster, so such a CPU is never slower than fp32
NCHW. Weights, optimiser state and losses stay fp32 under autocast.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .runtime import Dist, autocast, write_json

CACHE_ENV = "CLIPDISTILL_FORMAT_CACHE"  # the probe cache file; default ~/.cache/clipdistill/formats.json
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 arithmetic
MARGIN = 1.1  # a format must be this many times faster than the choice before it to replace it
PROBE_STEPS = 3  # timed steps per candidate, after one warm-up step; the fastest counts
LONG_STEP_S = 1.0  # a warm-up step longer than this: one timed step per candidate


@dataclass(frozen=True)
class Format:
    """How a loop runs: autocast dtype (None: fp32) and whether its modules are channels-last."""

    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    why: str = ""

    @property
    def name(self) -> str:
        dtype = "bf16" if self.amp_dtype is not None else "fp32"
        return f"{dtype} {'channels-last' if self.channels_last else 'NCHW'}"

    def apply(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` in this format's memory format (in place, as `Module.to`); unchanged for NCHW."""
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def describe(self, loop: str) -> str:
        return f"{loop}: {self.name} ({self.why})"


CANDIDATES = (Format(None, False), Format(None, True), Format(torch.bfloat16, False), Format(torch.bfloat16, True))
FP32_CANDIDATES = CANDIDATES[:2]  # what a CPU without native bf16 is probed over


def cpu_info() -> tuple[str, list[str]]:
    """(CPU model name, its native-bf16 flags) from /proc/cpuinfo; ("unknown", []) off Linux."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown", []
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return fields.get("model name", "unknown"), [f for f in NATIVE_BF16_FLAGS if f in flags]


def cache_path() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipdistill" / "formats.json"


Probe = Callable[[Format], Callable[[], None]]


def choose_format(loop: str, precision: str, device: torch.device, probe: Probe, signature: dict,
                  dist: Dist = Dist()) -> Format:
    """The format `loop` runs in under `precision` (auto | fp32 | bf16) on `device`.

    `probe(fmt)` prepares one representative step of the loop in `fmt` and returns it as a
    callable that changes nothing the loop uses: deep copies of the modules, no optimiser step
    (see `step_probe`). `signature` holds what the step's speed depends on (model widths, batch
    size, image side), for the cache key. Under torchrun rank 0 probes alone while the other
    ranks wait, then they read its answer from the cache: every rank runs the same format, and
    no probe is timed while another rank computes.
    """
    if dist.processes > 1 and not dist.main:
        dist.barrier()
    try:
        return _choose(loop, precision, device, probe, signature)
    finally:
        if dist.processes > 1 and dist.main:
            dist.barrier()


def _choose(loop: str, precision: str, device: torch.device, probe: Probe, signature: dict) -> Format:
    if precision == "fp32":
        return Format(None, device.type == "cuda", "precision: fp32")
    if precision == "bf16":
        return Format(torch.bfloat16, device.type == "cuda", "precision: bf16")
    if device.type == "cuda":
        return Format(torch.bfloat16, True, "auto on CUDA: tensor cores, cuDNN's NHWC kernels")
    model, flags = cpu_info()
    candidates = CANDIDATES if flags else FP32_CANDIDATES
    key_fields = {"loop": loop, "signature": signature, "cpu": model, "flags": flags,
                  "torch": torch.__version__, "threads": torch.get_num_threads()}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_path()
    cache = _read_cache(path)
    if key not in cache:
        seconds = _time_all(probe, candidates)
        cache[key] = {**key_fields, "seconds": seconds, "chosen": _fastest(seconds)}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, cache)
    entry = cache[key]
    chosen = next(fmt for fmt in CANDIDATES if fmt.name == entry["chosen"])
    timings = ", ".join(f"{name} {s * 1e3:.0f} ms" for name, s in entry["seconds"].items())
    what = ", ".join(flags) if flags else "no native bf16: fp32 only"
    return Format(chosen.amp_dtype, chosen.channels_last,
                  f"auto on {model} ({what}): fastest per step of {timings}; cached in {path}")


def step_probe(modules: dict[str, torch.nn.Module], step: Callable[..., torch.Tensor], device: torch.device) -> Probe:
    """A probe whose step runs `step(**copies)` under the format, on deep copies of `modules` in
    its memory format, and back-propagates the sum of what it returns. The originals, their
    gradients and their running statistics are untouched."""
    def prepare(fmt: Format) -> Callable[[], None]:
        copies = {name: fmt.apply(copy.deepcopy(module)) for name, module in modules.items()}

        def run() -> None:
            with autocast(device, fmt.amp_dtype):
                out = step(**copies)
            out.float().sum().backward()
        return run
    return prepare


def step_flops(probe: Probe, fmt: Format) -> float:
    """FLOPs of convolutions and matmuls in one probed step, forward and backward (norms and
    activations are not counted), for the achieved-rate line of `loop_rate`."""
    run = probe(fmt)
    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def loop_rate(loop: str, flops_per_step: float, steps: int, seconds: float) -> str:
    """The log line of a loop's achieved rate: `<loop> loop: N steps of G GFLOP in S s: R GFLOP/s`.
    benchmarks/stage_times.py collects these lines into its table. A resumed run counts the steps of
    the run it resumed too, so its rate reads high."""
    rate = flops_per_step * steps / max(seconds, 1e-9) / 1e9
    return f"{loop} loop: {steps} steps of {flops_per_step / 1e9:.4g} GFLOP in {seconds:.2f} s: {rate:.1f} GFLOP/s"


def _time_all(probe: Probe, candidates: tuple[Format, ...]) -> dict[str, float]:
    """Fastest of PROBE_STEPS timed steps per candidate, after a warm-up step of each (oneDNN builds
    its kernels on the first call). The candidates take turns, so none is timed while the machine
    is still warming up or under a passing load that the others do not see. A step slower than
    `LONG_STEP_S` (a real-size model on a CPU) is timed once per candidate: it is long enough to
    measure, and the probe stays a small part of the stage."""
    runs = {fmt.name: probe(fmt) for fmt in candidates}
    warm = {}
    for name, run in runs.items():
        start = time.perf_counter()
        run()
        warm[name] = time.perf_counter() - start
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(PROBE_STEPS if max(warm.values()) < LONG_STEP_S else 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _fastest(seconds: dict[str, float]) -> str:
    """The candidates in CANDIDATES' order (fp32 NCHW, fp32 channels-last, bf16 NCHW, bf16
    channels-last): each replaces the choice so far only if it is `MARGIN` faster than it. Two
    formats within timing noise of each other therefore resolve to the earlier one, fp32 before
    bf16, instead of to whichever the probe happened to time faster: on a 2-core AMD EPYC, two
    fresh probes of the small CLIP's loop timed fp32 and bf16 channels-last at 27 / 28 ms and
    25.6 / 23.6 ms, and picking the faster of each pair trained different weights."""
    order = [fmt.name for fmt in CANDIDATES if fmt.name in seconds]  # the timed ones, fp32 NCHW first
    chosen = order[0]
    for name in order[1:]:
        if seconds[name] * MARGIN < seconds[chosen]:
            chosen = name
    return chosen


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: probe again and rewrite it
    return data if isinstance(data, dict) else {}
