"""Sharded, resumable storage for synthesized images, as WebDataset tar shards.

Synthesis writes each finished shard to a work folder keyed by a hash of everything that
determines its content (params, prompt features, generator, teacher and class-vector files, the
package's code: `resumable.work_key`). DVC deletes a
stage's outputs before rerunning it, so the work folder lives beside the output: an interrupted
run resumes from its finished shards, and a change of inputs starts a fresh key. On success the
shards move into the output and the work folder is removed.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from .runtime import atomic_file


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[(start, end), ...] covering range(n) in shards of `shard_size`."""
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


SHARD_SUFFIX = ".tar"


def shard_name(i: int) -> str:
    return f"shard_{i:05d}{SHARD_SUFFIX}"


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One member with fixed metadata (no time, owner or mode of this machine): the same images
    give the same bytes on every machine."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def save_shard(path: Path, images: torch.Tensor, keys: list[str], **columns: torch.Tensor) -> None:
    """Atomically write uint8 images [n, 3, H, W] as a WebDataset tar shard: per sample `<key>.png`
    (lossless: distillation reads exactly the synthesized pixels) and `<key>.json` with its value
    of each 1-D column; a `labels` column is also written as `<key>.cls`, WebDataset's class
    label, so other tools (webdataset, open_clip training) read the shard as it is."""
    with atomic_file(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for r, key in enumerate(keys):
            row = {name: column[r].item() for name, column in columns.items()}
            _member(tar, f"{key}.png", _png(images[r]))
            if "labels" in row:
                _member(tar, f"{key}.cls", str(row["labels"]).encode())
            _member(tar, f"{key}.json", json.dumps(row, sort_keys=True).encode())


def load_shard(path: Path) -> dict | None:
    """A finished shard as {"images": uint8 [n, 3, H, W], "keys": [...], column: tensor [n]}, or
    None if it is absent or unreadable (then it is redone)."""
    if not path.is_file():
        return None
    try:
        with tarfile.open(path) as tar:
            images, rows, keys = [], [], []
            for member in tar:
                key, _, ext = member.name.rpartition(".")
                data = tar.extractfile(member).read()
                if ext == "png":
                    keys.append(key)
                    images.append(torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))))
                elif ext == "json":
                    rows.append(json.loads(data))
    except (tarfile.TarError, OSError, ValueError, EOFError):  # a shard killed mid-write is simply redone
        return None
    if not images or len(rows) != len(images):
        return None
    columns = {name: torch.tensor([row[name] for row in rows]) for name in rows[0]}
    for name, values in columns.items():
        if values.is_floating_point():
            columns[name] = values.float()
    return {"images": torch.stack(images).permute(0, 3, 1, 2).contiguous(), "keys": keys, **columns}


def finalize(work: Path, out: Path, names: list[str]) -> None:
    """Move the finished shards into `<out>/shards/` and drop the work folder."""
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for name in names:
        os.replace(work / name, out / "shards" / name)
    shutil.rmtree(work, ignore_errors=True)


PREVIEW_PER_CLASS = 8  # preview.png's columns: the first images of each class


def preview_grid(per_class: dict[int, list[torch.Tensor]], per_row: int = PREVIEW_PER_CLASS,
                 min_tile: int = 64) -> Image.Image:
    """Rows = classes (in key order), columns = up to `per_row` uint8 [3, H, W] images of each."""
    shape = next(img for imgs in per_class.values() for img in imgs).shape
    rows = []
    for c in sorted(per_class):
        tiles = per_class[c][:per_row]
        rows += tiles + [torch.zeros(shape, dtype=torch.uint8)] * (per_row - len(tiles))
    grid = torchvision.utils.make_grid(torch.stack(rows), nrow=per_row, padding=2, pad_value=255)
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    scale = max(1, -(-min_tile // shape[-1]))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)
