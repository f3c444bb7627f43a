"""Things every stage needs once: seeding, device choice, atomic outputs and one-line errors.

Outputs are written to a temporary sibling and renamed on success, so an interrupted stage never
leaves a half-written artifact that a later stage (or DVC) would trust.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch


class PipelineError(Exception):
    """A user-facing failure (bad params, input file or folder); a stage prints it as one line.

    The only exception type `run_stage` shortens: anything else is a bug and keeps its traceback.
    Subclasses (`ParamsError`, `vqgan.CheckpointError`) also derive from ValueError, as callers expect.
    """


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a CPU torch.Generator for explicit draws."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


# glibc mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_BLOCK_MAX = 32 * 2**20  # the largest mmap threshold glibc accepts on 64-bit
_HEAP_KEEP = 2**30            # free memory the heap keeps before giving pages back


def retain_freed_memory() -> bool:
    """glibc: serve tensors up to 32 MiB from the heap and keep freed memory for the next step.

    glibc's default hands blocks above its (dynamic, from 128 KiB) threshold fresh pages from mmap
    and gives them back on free, so each step of a CPU training or synthesis loop page-faults its
    activations in again: a forward + backward step of the embedded VQGAN decoder at batch 64
    takes 16k-26k page faults (64-100 MB of fresh pages, by thread count) with glibc's default and
    none once warm with this (tests/test_runtime.py counts them; `benchmarks/synthesis.py
    --default-malloc` measures the synthesis rate without it). Keeping freed memory is what torch's caching
    allocator does on CUDA; RSS stays near the peak in use plus at most 1 GiB. Returns whether it
    applied: False where libc is not glibc (macOS, musl), which keep their allocator's defaults.
    Results do not depend on it, only speed.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCK_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _HEAP_KEEP))


def release_free_memory() -> bool:
    """glibc: give the heaps' free pages back to the system now (`malloc_trim(0)`, every arena).

    `retain_freed_memory` bounds what the main heap keeps, but each thread that allocates (torch's
    intra-op threads) has an arena of its own that keeps its freed blocks too: streaming 100k
    images at 224 px through evaluate grew one process by 1.7 GB that way. Streamed reads call this
    every `image_sets.TRIM_EVERY` batches; it costs a walk of the free lists and the page faults of
    the next batch's buffers. False (and nothing done) where libc is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


UNSAFE_LOAD_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
DEVICES = ("cpu", "cuda", "auto")     # `device`: the values setup_torch resolves
PRECISIONS = ("auto", "fp32", "bf16")  # `precision`: the values resolve_precision maps to a dtype


def setup_torch(device: str, threads: int, retain_memory: bool = True) -> torch.device:
    """Resolve `cpu | cuda | auto` once; fail clearly when cuda is asked for but absent, or when
    the environment turns torch's weights-only loading off.

    Also sets the CPU allocator policy of the process (`retain_freed_memory`) unless told not to.
    """
    if os.environ.get(UNSAFE_LOAD_ENV, "") not in ("", "0"):
        # open_clip retries some loads with a plain torch.load, which this variable makes unsafe
        raise PipelineError(f"{UNSAFE_LOAD_ENV} is set, which lets a downloaded checkpoint run code; unset it")
    if retain_memory:
        retain_freed_memory()
    if threads > 0:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills every new tensor with NaN, a write over all of its memory, so that a
    # kernel that reads memory before writing it gives the same result each time. Ours write before
    # reading: a full `dvc repro` without the fill wrote every artifact bit for bit as with it (the same
    # output hashes in dvc.lock). Without it the teacher's step runs 1.03x, the smaller CLIP's 1.12x
    # and synthesis's 1.04x faster (benchmarks/clip_step.py, synthesis_ops.py: "NaN-filled").
    torch.utils.deterministic.fill_uninitialized_memory = False
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("device is 'cuda' but torch sees no CUDA GPU; set device: cpu or auto")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """`auto | fp32 | bf16` -> the autocast dtype, or None for plain fp32.

    What evaluation and export run in. auto is bf16 on CUDA (tensor cores; no loss scaling needed,
    unlike fp16) and fp32 on CPU, where those stages take seconds and accuracy is measured at full
    precision. The training and synthesis loops choose per loop with `formats.choose_format`.
    """
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if precision == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A fresh autocast context for `device` at `dtype` (a no-op when dtype is None)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def channels_last(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Channels-last weights on CUDA, where cuDNN convolutions run faster in NHWC; unchanged on CPU."""
    return module.to(memory_format=torch.channels_last) if device.type == "cuda" else module


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun launch: rank 0 of 1 when started plainly."""

    rank: int = 0
    processes: int = 1  # torchrun's WORLD_SIZE

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.processes > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.processes > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun set up (RANK / WORLD_SIZE / LOCAL_RANK in the environment).

    CUDA: NCCL, one GPU per process (cuda:LOCAL_RANK); with fewer GPUs than processes on the node
    the processes share them (cuda:LOCAL_RANK mod GPUs) over gloo, since NCCL refuses two ranks on
    one GPU (a check of N processes on a 1-GPU machine). CPU: gloo. Plain `python stage.py` is
    world size 1 and touches nothing. The timeout is long because ranks wait for each other only
    at the end of a stage, after hours of synthesis on real models.
    """
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes == 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if device.type == "cuda":
        gpus, on_node = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", processes))
        device = torch.device("cuda", local % gpus)
        torch.cuda.set_device(device)
        backend = "nccl" if gpus >= on_node else "gloo"
        if backend == "gloo" and local == 0:
            print(f"{on_node} processes share {gpus} GPU(s): gloo instead of NCCL")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=timedelta(hours=12))
    return Dist(rank, processes), device


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary directory that replaces `path` only if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | Path, sync: bool = False):
    """Yield a temporary file path that replaces `path` only if the block succeeds.

    `sync` flushes the file to disk before the rename (training checkpoints: a machine that dies
    right after must not leave a renamed but empty file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        if sync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def save_atomic(obj, path: str | Path, sync: bool = False) -> None:
    """torch.save `obj` to `path` through `atomic_file`: a kill mid-write leaves no truncated file."""
    with atomic_file(path, sync) as tmp:
        torch.save(obj, tmp)


def load_weights(path: str | Path):
    """The one torch.load of files this project writes: weights-only (tensors and plain
    containers; nothing in the file can run code), onto the CPU. Errors propagate."""
    return torch.load(path, map_location="cpu", weights_only=True)


def write_json(path: str | Path, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


DEBUG_ENV = "CLIPDISTILL_DEBUG"  # set to 1 to see the traceback of a user-facing error too


def run_stage(main) -> None:
    """Run a stage's main(); a PipelineError exits 1 with one line on stderr.

    Every other exception is an internal bug and propagates with its traceback; so does a
    PipelineError when CLIPDISTILL_DEBUG=1.
    """
    try:
        main()
    except PipelineError as exc:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(1)


def stage_args(description: str, *paths: str, optional: dict | None = None):
    """Parse the stage's path arguments (paths live in dvc.yaml, nowhere else), --params, and
    `optional` {name: default} arguments."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml")
    for name in paths:
        parser.add_argument(f"--{name}", required=True)
    for name, default in (optional or {}).items():
        parser.add_argument(f"--{name}", default=default)
    return parser.parse_args()


def read_word_list(path, what: str, hint: str = "") -> list[str]:
    """Entries of a one-per-line file ('#' starts a comment; blank lines skipped), in order.

    A missing file, an empty list or a duplicate entry is a one-line PipelineError naming `what`
    (e.g. "style dictionary") and the file; `hint` is appended to the not-found message.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} not found: {path}{hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{what} {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                            f"{exc.start}); save it as UTF-8, one entry per line") from None
    items = [line.split("#")[0].strip() for line in text.splitlines()]
    items = [i for i in items if i]
    if not items:
        raise PipelineError(f"{what} {path} is empty; list one entry per line")
    seen, dupes = set(), set()
    for i in items:
        (dupes if i in seen else seen).add(i)
    if dupes:
        raise PipelineError(f"{what} {path} lists {', '.join(sorted(dupes)[:5])} more than once")
    return items


def read_checkpoint(path, what: str, stage: str, key: str) -> dict:
    """torch.load(weights_only) of a checkpoint a stage wrote, which must hold `key`.

    A missing file, an unreadable one or one without `key` is a one-line PipelineError naming
    `what` ("student checkpoint") and the file; `stage` says which stage writes it.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} not found: {path} (run the {stage} stage)")
    try:
        blob = load_weights(path)
    except Exception as exc:  # any unreadable or foreign file is one error to the user
        raise PipelineError(f"{what} {path} is unreadable: {type(exc).__name__}") from None
    if not isinstance(blob, dict) or key not in blob:
        raise PipelineError(f"{what} {path} holds no '{key}': it is not an output of the {stage} stage")
    return blob
