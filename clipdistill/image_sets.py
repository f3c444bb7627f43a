"""Image sets that stream: every consumer reads images through one `ImageSet`, decoded on demand.

An `ImageSet` is a map-style torch Dataset of uint8 [3, S, S] images with a label per image (-1
when unknown), over decoded tensors in RAM (`Tensors`), image files (`Files`) or the members of
WebDataset tar shards (`TarImages`: `<key>.<image ext>` plus optional `<key>.cls`, the layout
open_clip training and img2dataset write). `batches()` yields the uint8 batches of given index
lists through a `DataLoader` (workers decode, the caller's thread trains), holding at most
`workers * 2` batches; `fit_in_memory()` decodes a set once into RAM when it is under the memory
budget, which is faster when it fits, and leaves it streaming otherwise.

Order and augmentation never depend on the workers: the caller draws every index list (and every
augmentation, on the device, after the copy) from its own generator, and the DataLoader only
decodes the lists it is given, in that order (`batch_sampler`, no shuffling of its own).
"""
from __future__ import annotations

import glob
import io
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import UnidentifiedImageError

from .image_files import IMAGE_SUFFIXES
from .runtime import PipelineError, release_free_memory

Decoder = Callable[[object], np.ndarray]  # a path or a binary file -> RGB uint8 [S, S, 3]


class ImageSet(torch.utils.data.Dataset):
    """uint8 images [3, S, S] by index; `labels` [N] (int64, -1 unknown); `size` S."""

    labels: torch.Tensor
    size: int

    def __len__(self) -> int:
        return len(self.labels)

    def nbytes(self) -> int:
        """Bytes the set takes decoded."""
        return len(self) * 3 * self.size * self.size

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        return Subset(self, torch.as_tensor(indices, dtype=torch.long))

    def describe(self) -> str:
        raise NotImplementedError


class Tensors(ImageSet):
    """Images already decoded into RAM, uint8 [N, 3, S, S]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        self.images = images
        self.labels = torch.full((len(images),), -1, dtype=torch.long) if labels is None else labels.long()
        self.size = images.shape[-1]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        return self.images[indices]

    def subset(self, indices: torch.Tensor) -> "Tensors":
        return Tensors(self.images[indices], self.labels[indices])

    def describe(self) -> str:
        return f"{len(self)} images in RAM"


class Subset(ImageSet):
    def __init__(self, base: ImageSet, indices: torch.Tensor):
        self.base, self.indices = base, indices
        self.labels, self.size = base.labels[indices], base.size

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.base[int(self.indices[i])]

    def describe(self) -> str:
        return f"{len(self)} of {self.base.describe()}"


def _decoded(decode: Decoder, source, name: str) -> torch.Tensor:
    try:
        array = decode(source)
    except (UnidentifiedImageError, OSError) as exc:
        raise PipelineError(f"corrupt or unreadable image: {name} ({type(exc).__name__})") from None
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


class Files(ImageSet):
    """Image files, decoded by `decode` when read."""

    def __init__(self, paths: Sequence[Path], labels: torch.Tensor, decode: Decoder, size: int, root: str = ""):
        self.paths, self.labels, self.decode, self.size = list(paths), labels.long(), decode, size
        self.root = root

    def __getitem__(self, i: int) -> torch.Tensor:
        return _decoded(self.decode, self.paths[i], str(self.paths[i]))

    def describe(self) -> str:
        return f"{len(self)} image files under {self.root}" if self.root else f"{len(self)} image files"


class TarImages(ImageSet):
    """The image members of WebDataset tar shards, in shard order then member order. Each sample
    is read by seeking to its offset, so any order costs one read per image."""

    def __init__(self, shards: Sequence[Path], decode: Decoder, size: int, labels: torch.Tensor | None = None):
        self.shards, self.decode, self.size = [Path(s) for s in shards], decode, size
        self.members: list[tuple[int, int, int, str]] = []  # (shard, offset, size, name)
        self.counts: list[int] = []  # images per shard
        found: list[int] = []
        for s, path in enumerate(self.shards):
            samples = list(_tar_samples(path))
            self.counts.append(len(samples))
            for key, image, cls in samples:
                self.members.append((s, image.offset_data, image.size, image.name))
                found.append(cls)
        self.labels = torch.tensor(found, dtype=torch.long) if labels is None else labels.long()
        self._handles: dict[int, object] = {}  # per process: workers open their own

    def __getitem__(self, i: int) -> torch.Tensor:
        s, offset, size, name = self.members[i]
        handle = self._handles.get(s)
        if handle is None:
            handle = self._handles[s] = open(self.shards[s], "rb")
        handle.seek(offset)
        return _decoded(self.decode, io.BytesIO(handle.read(size)), f"{self.shards[s]}:{name}")

    def __getstate__(self):  # worker processes reopen the files
        return {**self.__dict__, "_handles": {}}

    def describe(self) -> str:
        return f"{len(self)} images in {len(self.shards)} tar shards"


def _tar_samples(path: Path) -> Iterator[tuple[str, tarfile.TarInfo, int]]:
    """(key, image member, label or -1) per sample of one WebDataset shard. A sample is the
    members sharing a key (the name up to the first dot of its last component)."""
    try:
        with tarfile.open(path) as tar:
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                key, dot, ext = base.partition(".")
                if dot:
                    samples.setdefault(f"{directory}/{key}", {})[ext.lower()] = member
            for key, parts in samples.items():
                image = next((parts[e] for e in parts if f".{e}" in IMAGE_SUFFIXES), None)
                if image is None:
                    continue
                label = int(tar.extractfile(parts["cls"]).read().decode().strip()) if "cls" in parts else -1
                yield key, image, label
    except (tarfile.TarError, OSError, ValueError) as exc:
        detail = (str(exc).splitlines() or [""])[-1].strip(" -")
        raise PipelineError(f"tar shard {path} is unreadable: {type(exc).__name__} ({detail})") from None


def expand_shards(pattern: str) -> list[Path]:
    """WebDataset shard names: `{00000..01023}` ranges (zero-padded as written) and glob wildcards."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match:
        lo, hi = match.group(1), match.group(2)
        width = len(lo)
        out: list[Path] = []
        for n in range(int(lo), int(hi) + 1):
            out += expand_shards(pattern[:match.start()] + f"{n:0{width}d}" + pattern[match.end():])
        return out
    if any(c in pattern for c in "*?["):
        return [Path(p) for p in sorted(glob.glob(pattern))]
    return [Path(pattern)]


def is_tar_pattern(spec: str) -> bool:
    return spec.endswith(".tar")


def tar_images(spec: str, decode: Decoder, size: int) -> TarImages:
    shards = expand_shards(spec)
    missing = [s for s in shards if not s.is_file()]
    if not shards or missing:
        raise PipelineError(f"tar shard not found: {missing[0] if missing else spec}")
    images = TarImages(shards, decode, size)
    if not len(images):
        raise PipelineError(f"no images in the tar shards {spec} ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def as_image_set(images: "ImageSet | torch.Tensor") -> ImageSet:
    """An ImageSet as it is; a uint8 [N, 3, S, S] tensor as `Tensors` (library callers' form)."""
    return images if isinstance(images, ImageSet) else Tensors(images)


def _stack(items: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(items)


# Streamed batches between two `release_free_memory` calls: each call hands back what the retain
# policy keeps for the next step, so the step after it page-faults its buffers again; every 8th
# batch still keeps a 100k-image evaluate within 1.14x of a 2k one (docs/results.md, Data at scale).
TRIM_EVERY = 8


def batches(images: ImageSet, index_lists: Iterable[torch.Tensor], *, workers: int,
            device: torch.device | None = None) -> Iterator[torch.Tensor]:
    """uint8 [B, 3, S, S] per index list, in order; on `device` when given (pinned host memory and
    a non-blocking copy on CUDA). In-RAM sets are indexed directly; the others are decoded by a
    DataLoader with `workers` processes (0: on this thread)."""
    if isinstance(images, Tensors):
        for idx in index_lists:
            x = images.take(idx)
            yield x if device is None else x.to(device)
        return
    cuda = device is not None and device.type == "cuda"
    # Its own generator: a DataLoader draws a base seed for its workers when it starts, which
    # would otherwise advance the global RNG that model initialisation reads after it.
    loader = torch.utils.data.DataLoader(images, batch_sampler=[idx.tolist() for idx in index_lists],
                                         num_workers=workers, collate_fn=_stack, pin_memory=cuda,
                                         prefetch_factor=2 if workers else None, generator=torch.Generator())
    for k, x in enumerate(loader, 1):
        yield x if device is None else x.to(device, non_blocking=cuda)
        if k % TRIM_EVERY == 0:  # the heaps' free blocks, so a long stream can't grow them
            release_free_memory()


def sequential(n: int, batch_size: int) -> list[torch.Tensor]:
    """Index lists covering range(n) in order, the last one short."""
    return [torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def decode_all(images: ImageSet, workers: int, batch_size: int = 256) -> Tensors:
    """The whole set decoded into RAM."""
    if isinstance(images, Tensors):
        return images
    chunks = list(batches(images, sequential(len(images), batch_size), workers=workers))
    stacked = torch.cat(chunks) if chunks else torch.zeros(0, 3, images.size, images.size, dtype=torch.uint8)
    return Tensors(stacked, images.labels)


def fit_in_memory(images: ImageSet, budget_mb: float, workers: int, what: str) -> ImageSet:
    """`images` decoded once into RAM if they take at most `budget_mb` MB decoded, else as they are
    (streamed each epoch); says which in one line."""
    mb = images.nbytes() / 2**20
    if isinstance(images, Tensors) or mb > budget_mb:
        how = "in RAM" if isinstance(images, Tensors) else f"streamed by {workers} workers" if workers else "streamed"
        print(f"{what}: {images.describe()}, {mb:,.0f} MB decoded, {how} (data.memory_budget_mb {budget_mb:g})")
        return images
    print(f"{what}: {images.describe()}, {mb:,.0f} MB decoded, read into RAM (data.memory_budget_mb {budget_mb:g})")
    return decode_all(images, workers)


class EpochReader:
    """The images of `order.batch(step)` for consecutive steps, decoded ahead through `batches()`
    within each epoch: the epoch's permutation is drawn (from the training generator, as always)
    at its first step, so prefetching never moves a random draw."""

    def __init__(self, images: ImageSet, order, workers: int):
        self.images, self.order, self.workers = images, order, workers
        self._epoch, self._next, self._stream = None, None, None

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [B], uint8 images [B, 3, S, S]) of training step `step`."""
        idx = self.order.batch(step)
        if isinstance(self.images, Tensors):
            return idx, self.images.take(idx)
        epoch, b = divmod(step, self.order.steps_per_epoch)
        if (epoch, b) != (self._epoch, self._next):
            size = self.order.batch_size
            lists = [self.order.order[k * size:(k + 1) * size] for k in range(b, self.order.steps_per_epoch)]
            self._stream, self._epoch = batches(self.images, lists, workers=self.workers), epoch
        self._next = b + 1
        return idx, next(self._stream)
