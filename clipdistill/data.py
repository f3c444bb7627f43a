"""Where the pipeline's images come from: PACS-style folders (`<root>/<domain>/<class>/*`), the
world's captions, unlabeled folders or WebDataset tars, and the synthesized shards. Each is an
`image_sets.ImageSet` (decoded when read, or in RAM); models take [0, 1] floats.

Image files are decoded by `file_decoder(prep)`: the teacher's own preprocessing geometry
(`preprocess.Preprocess`: CLIP's shortest-side resize and centre crop for open_clip models) at
the pipeline's image side; the embedded world's square renders are already at that side.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd
import torch

from .image_files import IMAGE_SUFFIXES
from .image_sets import Files, ImageSet, TarImages, batches, decode_all, is_tar_pattern, sequential, tar_images
from .preprocess import Preprocess, clip_default, decode
from .runtime import PipelineError


def file_decoder(prep: Preprocess):
    """path or binary file -> RGB uint8 [S, S, 3] by `prep`'s geometry (picklable, for workers)."""
    return functools.partial(decode, prep=prep)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_domain_folder(root: str | Path, classes: list[str], prep: Preprocess,
                       domains: list[str] | None = None) -> dict[str, ImageSet]:
    """`<root>/<domain>/<class>/*` as {domain: image set with class labels}, decoded when read.

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
        paths, labels = [], []
        for label, cls in enumerate(classes):
            if cls in present:
                found = list_images(droot / cls)
                paths += found
                labels += [label] * len(found)
        if not paths:
            raise PipelineError(f"no images found under {droot}")
        out[domain] = Files(paths, torch.tensor(labels), file_decoder(prep), prep.size, str(droot))
    return out


def check_readable(images: ImageSet, workers: int) -> None:
    """Decode every image once and drop it: a corrupt file fails here, naming it."""
    for _ in batches(images, sequential(len(images), 256), workers=workers):
        pass


def world_test_root(params, world_dir: str | Path) -> Path:
    """Where the evaluated `<domain>/<class>/*` images live: the rendered world's test split, or
    world.root for a PACS-style dataset (world.source folder)."""
    return Path(params.world.root) if params.world.source == "folder" else Path(world_dir) / "test"


def load_captioned_split(split_dir: str | Path, prep: Preprocess) -> tuple[ImageSet, list[str], list[str]]:
    """The world's train split: (images, captions, class names) from captions.csv."""
    split_dir = Path(split_dir)
    table = split_dir / "captions.csv"
    if not table.is_file():
        raise PipelineError(f"captions table not found: {table} (run the world stage)")
    df = pd.read_csv(table)
    images = Files([split_dir / p for p in df["path"]], torch.full((len(df),), -1), file_decoder(prep), prep.size,
                   str(split_dir))
    return images, df["caption"].tolist(), df["class"].tolist()


def load_shards(synth_dir: str | Path, size: int) -> tuple[ImageSet, pd.DataFrame]:
    """The synthesized images (WebDataset tar shards, lossless PNGs at the pipeline's side, so
    decoding resizes nothing) in index order, with the index table; labels from the index."""
    synth_dir = Path(synth_dir)
    index_path = synth_dir / "index.csv"
    if not index_path.is_file():
        raise PipelineError(f"synthesis index not found: {index_path} (run the synthesize stage)")
    index = pd.read_csv(index_path)
    names = list(index["shard"].unique())
    images = TarImages([synth_dir / "shards" / name for name in names], file_decoder(clip_default(size)), size,
                       torch.tensor(index["label"].to_numpy()))
    for name, found in zip(names, images.counts):
        expected = int((index["shard"] == name).sum())
        if found != expected:
            raise PipelineError(f"shard {synth_dir / 'shards' / name} is unreadable: it holds {found} of the "
                                f"{expected} images index.csv lists (truncated?)")
    return images, index


def load_unlabeled(spec: str | Path, classes: list[str], prep: Preprocess) -> ImageSet:
    """Unlabeled real images for distillation (PromptKD's and KDPL's setting): a folder (every
    image at any depth, sorted by path) or WebDataset tar shards (`data/x/{00000..01023}.tar`).

    Labels: for a folder, the index in `classes` of the nearest parent folder named like a class
    (-1 if none); for tars, a sample's `.cls` member (-1 if none). Training never reads them; they
    only select the base classes' images for the base-to-novel split.
    """
    spec = str(spec)
    if is_tar_pattern(spec):
        return tar_images(spec, file_decoder(prep), prep.size)
    root = Path(spec)
    if not root.is_dir():
        raise PipelineError(f"image folder not found: {root}")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise PipelineError(f"image folder {root} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    index = {c: i for i, c in enumerate(classes)}
    labels = [next((index[q.name] for q in p.relative_to(root).parents if q.name in index), -1) for p in paths]
    return Files(paths, torch.tensor(labels), file_decoder(prep), prep.size, str(root))


def fit_domains(domains: dict[str, ImageSet], budget_mb: float, workers: int, what: str) -> dict[str, ImageSet]:
    """Every domain read into RAM once if all of them together fit `budget_mb` (they are scored by
    several models), else all streamed."""
    mb = sum(d.nbytes() for d in domains.values()) / 2**20
    n = sum(len(d) for d in domains.values())
    if mb > budget_mb:
        print(f"{what}: {n} images in {len(domains)} domains, {mb:,.0f} MB decoded, streamed "
              f"(data.memory_budget_mb {budget_mb:g})")
        return domains
    return {name: decode_all(d, workers) for name, d in domains.items()}
