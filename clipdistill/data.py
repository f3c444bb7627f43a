"""Image loading: PACS-style folders (`<root>/<domain>/<class>/*`), the world's captions, and the
synthesized shards. Images travel as uint8 [N, 3, H, W] tensors; models take [0, 1] floats.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import UnidentifiedImageError

from .image_files import IMAGE_SUFFIXES, decode_rgb
from .runtime import PipelineError, load_weights


def read_image(path: Path, size: int) -> np.ndarray:
    """RGB uint8 [size, size, 3] (`image_files.decode_rgb`); a corrupt file is a one-line error naming it."""
    try:
        return decode_rgb(path, size)
    except (UnidentifiedImageError, OSError) as exc:
        raise PipelineError(f"corrupt or unreadable image: {path} ({type(exc).__name__})") from None


def to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    """list of [H, W, 3] uint8 -> uint8 [N, 3, H, W]."""
    if not arrays:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_domain_folder(root: str | Path, classes: list[str], size: int,
                       domains: list[str] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read `<root>/<domain>/<class>/*` into {domain: (uint8 images [N,3,S,S], labels [N])}.

    Class folders are matched to `classes` by name (PACS-style data may spell them differently:
    rename the folders or the classes). A missing root, a domain without any class folder of the
    params, or a domain with no image is a one-line error.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise PipelineError(f"image folder {root} is a file, not a folder (<root>/<domain>/<class>/*)")
    if not root.is_dir():
        raise PipelineError(f"image folder not found: {root}")
    listed = bool(domains)  # the caller's domains (world.eval_domains), not the folder's own
    domains = domains or sorted(d.name for d in root.iterdir() if d.is_dir())
    if not domains:
        raise PipelineError(f"image folder {root} has no domain sub-folders (<root>/<domain>/<class>/*)")
    out = {}
    for domain in domains:
        droot = root / domain
        if not droot.is_dir():
            where = f" (world.eval_domains lists {domain!r})" if listed else ""
            raise PipelineError(f"domain folder not found: {droot}{where}")
        present = {d.name for d in droot.iterdir() if d.is_dir()}
        unknown = sorted(present - set(classes))
        if unknown:
            raise PipelineError(f"class folder {droot / unknown[0]} is not in world.classes")
        if not present:
            hint = (f"; {domain} is a class name: is {root} <root>/<class>/* without the domain level?"
                    if domain in classes else "")
            raise PipelineError(f"domain folder {droot} has no class folder (<root>/<domain>/<class>/* with the "
                                f"classes of world.classes: {', '.join(classes[:8])}){hint}")
        images, labels = [], []
        for label, cls in enumerate(classes):
            if cls not in present:
                continue
            for path in list_images(droot / cls):
                images.append(read_image(path, size))
                labels.append(label)
        if not images:
            raise PipelineError(f"no images found under {droot}")
        out[domain] = (to_tensor(images), torch.tensor(labels))
    return out


def world_test_root(params, world_dir: str | Path) -> Path:
    """Where the evaluated `<domain>/<class>/*` images live: the rendered world's test split, or
    world.root for a PACS-style dataset (world.source folder)."""
    return Path(params.world.root) if params.world.source == "folder" else Path(world_dir) / "test"


def load_captioned_split(split_dir: str | Path, size: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """The world's train split: (uint8 images [N,3,S,S], captions, class names) from captions.csv."""
    split_dir = Path(split_dir)
    table = split_dir / "captions.csv"
    if not table.is_file():
        raise PipelineError(f"captions table not found: {table} (run the world stage)")
    df = pd.read_csv(table)
    images = to_tensor([read_image(split_dir / p, size) for p in df["path"]])
    return images, df["caption"].tolist(), df["class"].tolist()


def load_shards(synth_dir: str | Path) -> tuple[torch.Tensor, pd.DataFrame]:
    """All synthesized images (uint8 [N,3,H,W]) in index order, with the index table."""
    synth_dir = Path(synth_dir)
    index_path = synth_dir / "index.csv"
    if not index_path.is_file():
        raise PipelineError(f"synthesis index not found: {index_path} (run the synthesize stage)")
    index = pd.read_csv(index_path)
    shards = {}
    for name in index["shard"].unique():
        path = synth_dir / "shards" / name
        try:
            shards[name] = load_weights(path)["images"]
        except Exception as exc:  # a truncated or foreign file is one error to the user
            raise PipelineError(f"shard {path} is unreadable: {type(exc).__name__}") from None
    images = torch.stack([shards[s][r] for s, r in zip(index["shard"], index["row"])])
    return images, index


def load_unlabeled_folder(root: str | Path, classes: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image under `root` (any depth) as uint8 [N, 3, S, S], sorted by path, for distillation
    on unlabeled real images (PromptKD's and KDPL's setting).

    The second tensor [N] is the index in `classes` of the nearest parent folder named like a class
    (-1 if none). Training never reads it; it only selects the base classes' images for the
    base-to-novel split when the folder is class-structured (`<root>/<domain>/<class>/*`).
    """
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"image folder not found: {root}")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise PipelineError(f"image folder {root} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    index = {c: i for i, c in enumerate(classes)}
    labels = [next((index[q.name] for q in p.relative_to(root).parents if q.name in index), -1) for p in paths]
    return to_tensor([read_image(p, size) for p in paths]), torch.tensor(labels)
