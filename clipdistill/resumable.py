"""Resumable training: the one step loop every training stage runs, with periodic checkpoints.

A stage's training state (modules, optimiser, scheduler, sampler, every RNG, step, losses) is
saved every N steps into a work folder beside the stage's output, keyed by a hash of everything
that determines the result (params, input files, the package's code). DVC deletes a stage's
outputs before rerunning it, so resumable state cannot live inside them. A rerun after a kill
continues from the newest readable checkpoint and ends bit-identical to an uninterrupted run (same
machine, same thread count); a change of inputs or code gets a fresh key and starts from step 0.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .progress import progress as progress_bar
from .runtime import Dist, load_weights, save_atomic

PACKAGE_DIR = Path(__file__).resolve().parent
_NAME = "step_{:09d}.pt"


def file_digest(path: str | Path) -> str:
    """sha256 of a file's contents."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fingerprint(path: Path, h) -> None:
    """Files by content; folders, and WebDataset tar shards, by the relative path, size and mtime of
    every file (hashing the contents of a million-image folder would take longer than the stage)."""
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    elif path.is_file() and path.suffix == ".tar":
        st = path.stat()
        h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    elif path.is_file():
        h.update(file_digest(path).encode())
    else:
        h.update(f"absent:{path}".encode())


def work_key(config: dict, inputs: list[str | Path], code: bool = True) -> str:
    """Stable 16-hex key of a JSON-able config, the input files or folders, and (code=True) the
    package's source and the running script, so a checkpoint is never resumed by other code or on
    other inputs."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for path in inputs:
        _fingerprint(Path(path), h)
    if code:
        for f in sorted(PACKAGE_DIR.rglob("*.py")):
            h.update(f"{f.relative_to(PACKAGE_DIR).as_posix()}\0{file_digest(f)}\n".encode())
        script = getattr(sys.modules.get("__main__"), "__file__", None)  # the stage script itself
        if script and Path(script).is_file():
            h.update(file_digest(script).encode())
    return h.hexdigest()[:16]


def work_dir(out: str | Path, key: str) -> Path:
    """`<parent>/.<out name>.work/<key>`: beside the stage output, outside what DVC deletes."""
    out = Path(out)
    return out.with_name(f".{out.name}.work") / key


def remove_work_dir(work: Path) -> None:
    """Drop a finished stage's work folder, and its parent once no other key is left in it."""
    shutil.rmtree(work, ignore_errors=True)
    parent = work.parent
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


def rng_state(generators: list[torch.Generator]) -> dict:
    """Every RNG a loop may draw from: torch (CPU and CUDA), python, numpy and the loop's generators."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "generators": [g.get_state() for g in generators],
    }


def set_rng_state(state: dict, generators: list[torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy(), *rest))
    for g, s in zip(generators, state["generators"], strict=True):
        g.set_state(s)


class Checkpoints:
    """Numbered training-state files in one work folder, written atomically by rank 0.

    `every` steps (0: never) and at the last step; the newest `keep` files are kept, so a file
    that turns out unreadable (a kill while the disk wrote it, a full disk) falls back to the one
    before. `folder=None` disables checkpointing (library use outside a stage).
    """

    def __init__(self, folder: Path | None, every: int, dist: Dist = Dist(), keep: int = 2):
        self.folder, self.every, self.dist, self.keep = folder, every, dist, keep

    @classmethod
    def for_stage(cls, out: str | Path, config: dict, inputs: list[str | Path], every: int,
                  dist: Dist = Dist()) -> Checkpoints:
        """Checkpoints of the stage writing `out`, in its work folder keyed by `work_key(config, inputs)`."""
        return cls(work_dir(out, work_key(config, inputs)), every, dist)

    def sub(self, name: str) -> Checkpoints:
        """Checkpoints of one of several trainings in a stage (e.g. distill's base-to-novel student)."""
        return Checkpoints(self.folder / name, self.every, self.dist, self.keep)

    def clear(self) -> None:
        """Drop the work folder once the stage's outputs are written."""
        if self.folder is not None and self.dist.main:
            remove_work_dir(self.folder)

    def _files(self) -> list[Path]:
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(self.folder.glob("step_*.pt"))

    def latest(self) -> dict | None:
        """The newest readable checkpoint, or None."""
        for path in reversed(self._files()):
            try:
                return load_weights(path)
            except Exception as exc:  # truncated or corrupt: the previous file is the fallback
                print(f"checkpoint {path} is unreadable ({type(exc).__name__}); trying the one before")
        return None

    def due(self, step: int, total: int) -> bool:
        """Whether to save after `step` steps (1-based count)."""
        return self.folder is not None and ((self.every > 0 and step % self.every == 0) or step == total)

    def save(self, step: int, state: dict) -> None:
        if not self.dist.main:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        save_atomic(state, self.folder / _NAME.format(step), sync=True)
        for old in self._files()[:-self.keep]:
            old.unlink(missing_ok=True)


class TensorState:
    """A tensor a loop updates in place (e.g. codebook usage counts), checkpointed with the rest."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def state_dict(self) -> dict:
        return {"tensor": self.tensor.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.tensor.copy_(state["tensor"])


class TrainableState:
    """A module's trainable parameters and buffers: what training changes. Frozen parameters (a
    prompt student's CLIP towers, hundreds of MB on the real path) are left out of checkpoints,
    since the stage rebuilds them identically before resuming."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def _frozen(self) -> set[str]:
        return {n for n, p in self.module.named_parameters() if not p.requires_grad}

    def state_dict(self) -> dict:
        frozen = self._frozen()
        return {k: v for k, v in self.module.state_dict().items() if k not in frozen}

    def load_state_dict(self, state: dict) -> None:
        missing, unexpected = self.module.load_state_dict(state, strict=False)
        if unexpected or set(missing) - self._frozen():
            raise RuntimeError(f"checkpoint does not fit the module: missing {missing[:5]}, unexpected {unexpected[:5]}")


class EpochOrder:
    """Index batches of a fresh random permutation each epoch, drawn from `generator` at the first
    step of the epoch; `drop_last` batches only, since BatchNorm needs more than one image.
    Resumable mid-epoch: the current permutation is part of its state."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.steps_per_epoch = max(1, n // batch_size)
        self.epoch, self.order = -1, torch.zeros(0, dtype=torch.long)

    def batch(self, step: int) -> torch.Tensor:
        """Indices [batch_size] of step `step` (0-based over all epochs)."""
        epoch, b = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.epoch, self.order = epoch, torch.randperm(self.n, generator=self.generator)
        return self.order[b * self.batch_size:(b + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.order = state["epoch"], state["order"]


def run_steps(step_fn: Callable[[int], float], total: int, *, state: dict, generators: list[torch.Generator],
              checkpoints: Checkpoints | None = None, desc: str, progress: bool = True,
              after_step: Callable[[int], None] | None = None) -> list[float]:
    """Call `step_fn(step) -> loss` for step = 0 .. total-1, resuming from the newest checkpoint.

    `state` maps names to objects with state_dict()/load_state_dict() (modules, optimisers,
    schedulers, EpochOrder, TensorState); with every RNG in `rng_state` and the losses so far they
    make a checkpoint. `progress`: show a bar (False on every rank but 0). `after_step(step)` runs
    after each step, before its checkpoint (what it records belongs in `state`). Returns the loss
    of every step, resumed ones included.
    """
    checkpoints = checkpoints or Checkpoints(None, 0)
    losses: list[float] = []
    start = 0
    saved = checkpoints.latest()
    if saved is not None:
        for name, obj in state.items():
            obj.load_state_dict(saved["state"][name])
        set_rng_state(saved["rng"], generators)
        losses, start = list(saved["losses"]), int(saved["step"])
        print(f"{desc}: resuming from step {start} of {total} ({checkpoints.folder})")
    bar = progress_bar(total, initial=start, desc=desc, unit="step", enabled=progress)
    for step in range(start, total):
        losses.append(step_fn(step))
        if after_step is not None:
            after_step(step)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        bar.update(1)
        if checkpoints.due(step + 1, total):
            checkpoints.save(step + 1, {"step": step + 1, "losses": losses, "rng": rng_state(generators),
                                        "state": {name: obj.state_dict() for name, obj in state.items()}})
    bar.close()
    return losses
