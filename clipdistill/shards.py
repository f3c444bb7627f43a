"""Sharded, resumable storage for synthesized images.

Synthesis writes each finished shard to a work folder keyed by a hash of everything that
determines its content (params, prompt features, generator, teacher and class-vector files, the
package's code: `resumable.work_key`). DVC deletes a
stage's outputs before rerunning it, so the work folder lives beside the output: an interrupted
run resumes from its finished shards, and a change of inputs starts a fresh key. On success the
shards move into the output and the work folder is removed.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torchvision
from PIL import Image

from .runtime import load_weights, save_atomic


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[(start, end), ...] covering range(n) in shards of `shard_size`."""
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.pt"


def save_shard(path: Path, images: torch.Tensor, **columns) -> None:
    """Atomically write uint8 images [n, 3, H, W] and per-image columns."""
    save_atomic({"images": images.contiguous(), **columns}, path)


def load_shard(path: Path) -> dict | None:
    """A finished shard, or None if it is absent or unreadable (then it is redone)."""
    if not path.is_file():
        return None
    try:
        return load_weights(path)
    except Exception:  # a shard killed mid-write is simply redone
        return None


def finalize(work: Path, out: Path, names: list[str]) -> None:
    """Move the finished shards into `<out>/shards/` and drop the work folder."""
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for name in names:
        os.replace(work / name, out / "shards" / name)
    shutil.rmtree(work, ignore_errors=True)


def preview_grid(images: torch.Tensor, labels: list[int], n_classes: int, per_row: int = 8,
                 min_tile: int = 64) -> Image.Image:
    """Rows = classes, columns = the first `per_row` samples of each; uint8 [N, 3, H, W] in."""
    rows = []
    for c in range(n_classes):
        idx = [i for i, lab in enumerate(labels) if lab == c][:per_row]
        tiles = images[idx] if idx else images[:0]
        pad = torch.zeros(per_row - len(idx), *images.shape[1:], dtype=images.dtype)
        rows.append(torch.cat([tiles, pad]))
    grid = torchvision.utils.make_grid(torch.cat(rows), nrow=per_row, padding=2, pad_value=255)
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    scale = max(1, -(-min_tile // images.shape[-1]))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)
