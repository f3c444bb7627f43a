"""Classify images with an exported student: an ONNX model (onnxruntime; never imports torch) or a
distill-stage `.pt` checkpoint, preprocessed exactly as the pipeline reads images.

Usage: python -m clipdistill.predict MODEL INPUT... [--top-k 5] [--format csv|json] [--output PATH]
       [--batch-size 64] [--meta PATH]     (exit 0: all classified, 1: some images failed, 2: usage)
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
import tempfile
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .image_files import IMAGE_SUFFIXES
from .preprocess import Preprocess, clip_default, decode

GEOMETRY = ("resize_mode", "interpolation", "fill_color")  # the card's decoding keys

GLOB_CHARS = set("*?[")
# What PIL raises for unreadable files: OSError (incl. UnidentifiedImageError, truncation),
# SyntaxError/ValueError from some plugins' parsers, DecompressionBombError for huge images.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

Runner = Callable[[np.ndarray], np.ndarray]  # float32 images [B, 3, S, S] -> logits [B, C]


class UsageError(Exception):
    """A bad command line or input file: printed as one `error:` line, exit 2, nothing written."""


@dataclass(frozen=True)
class Meta:
    """What the exported model's metadata JSON says about its classes and input."""
    classes: list[str]
    prep: Preprocess  # the size and decoding geometry the stages used
    mean: np.ndarray | None = None  # float32 [3, 1, 1]; None when the model normalises itself
    std: np.ndarray | None = None


@dataclass(frozen=True)
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class, probability), most probable first; empty on error
    error: str | None = None


def load_meta(path: Path) -> Meta:
    """Read and check the metadata JSON; any missing or malformed field is a UsageError naming `path`."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"metadata not found: {path} (give --meta PATH)") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"metadata {path} is unreadable: {type(exc).__name__}") from None
    raw = raw if isinstance(raw, dict) else {}
    inp = raw.get("input") if isinstance(raw.get("input"), dict) else {}
    classes, size = raw.get("classes"), inp.get("size")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise UsageError(f"metadata {path} lacks 'classes' (a non-empty list of names)")
    if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
        raise UsageError(f"metadata {path} lacks 'input.size' (a positive integer)")
    if inp.get("layout", "NCHW") != "NCHW":
        raise UsageError(f"metadata {path}: only input.layout NCHW is supported, not {inp['layout']}")
    try:  # a card without the geometry keys: CLIP's shortest-side bicubic resize and centre crop
        prep = dataclasses.replace(clip_default(size), **{k: inp[k] for k in GEOMETRY if k in inp})
    except (ValueError, TypeError) as exc:
        raise UsageError(f"metadata {path}: {exc}") from None
    if inp.get("normalised_by_model", True):
        return Meta(classes, prep)
    return Meta(classes, prep, _channel_stats(inp, "mean", path), _channel_stats(inp, "std", path))


def _channel_stats(inp: dict, key: str, path: Path) -> np.ndarray:
    """input.mean / input.std as float32 [3, 1, 1], broadcasting over a [3, S, S] image."""
    try:
        stats = np.asarray(inp[key], dtype=np.float32).reshape(3, 1, 1)
    except (KeyError, TypeError, ValueError):
        stats = None
    if stats is None or (key == "std" and not np.all(stats > 0)):
        raise UsageError(f"metadata {path}: normalised_by_model is false but input.{key} is not 3 numbers"
                         + (" > 0" if key == "std" else ""))
    return stats


def read_image(path: Path, meta: Meta) -> np.ndarray:
    """float32 [3, S, S] in [0, 1] (then mean/std-normalised if the model does not do that itself).

    The pipeline's own decoding (`preprocess.decode` with the card's geometry), then its
    uint8 -> float / 255.
    """
    x = decode(path, meta.prep).transpose(2, 0, 1).astype(np.float32) / 255
    return x if meta.mean is None else (x - meta.mean) / meta.std


def image_files(folder: Path) -> list[Path]:
    """Images anywhere under `folder`, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def expand_input(arg: str) -> list[Path]:
    """One INPUT argument: a file (taken as given, whatever its suffix), a folder, or a glob."""
    path = Path(arg)
    if path.is_dir():
        return image_files(path)
    if path.exists():
        return [path]
    if not GLOB_CHARS & set(arg):
        raise UsageError(f"input not found: {arg}")
    found = []
    for match in map(Path, sorted(glob.glob(arg, recursive=True))):
        if match.is_dir():
            found += image_files(match)
        elif match.suffix.lower() in IMAGE_SUFFIXES:  # a glob searches, like a folder
            found.append(match)
    return found


def expand_inputs(args: list[str]) -> list[Path]:
    """All INPUT arguments in order, each file once (the first spelling of it wins)."""
    paths, seen = [], set()
    for arg in args:
        for path in expand_input(arg):
            if (key := os.path.realpath(path)) not in seen:
                seen.add(key)
                paths.append(path)
    if not paths:
        raise UsageError(f"no images matched: {' '.join(args)}")
    return paths


def onnx_runner(path: Path) -> Runner:
    import onnxruntime as ort  # imported here so --help and the .pt path do not pay for it

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors for a bad file share no useful base class
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"cannot load model {path}: {reason}") from None
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]


def torch_runner(path: Path) -> Runner:
    import torch  # the only place torch is imported: the ONNX path must work without it

    from clipdistill.students import load_student
    from clipdistill.runtime import PipelineError

    try:
        model = load_student(path)
    except PipelineError as exc:
        raise UsageError(str(exc)) from None

    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(images)).float().numpy()
    return run


RUNNERS = {".onnx": onnx_runner, ".pt": torch_runner}


def softmax(logits: np.ndarray) -> np.ndarray:
    """[B, C] logits -> float64 [B, C] probabilities."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)  # so exp never overflows
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_classes(probs: np.ndarray, classes: list[str], k: int) -> list[list[tuple[str, float]]]:
    """[B, C] probabilities -> per image the k most probable (class, prob); ties keep class order."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(classes[j], float(row[j])) for j in idx] for row, idx in zip(probs, order)]


def classify_batch(paths: list[Path], meta: Meta, run: Runner, k: int) -> list[Prediction]:
    """Read and classify `paths`; an unreadable image gets an error instead of stopping the batch."""
    images, errors = {}, {}
    for i, path in enumerate(paths):
        try:
            images[i] = read_image(path, meta)
        except IMAGE_ERRORS as exc:
            errors[i] = f"unreadable image: {type(exc).__name__}"
    tops = {}
    if images:
        logits = np.asarray(run(np.stack(list(images.values()))))
        if logits.shape != (len(images), len(meta.classes)):
            raise UsageError(f"the model returns logits of shape {logits.shape} for {len(images)} images, "
                             f"but the metadata lists {len(meta.classes)} classes")
        tops = dict(zip(images, top_classes(softmax(logits), meta.classes, k)))
    return [Prediction(str(path), tops.get(i, []), errors.get(i)) for i, path in enumerate(paths)]


def classify(paths: list[Path], meta: Meta, run: Runner, k: int, batch_size: int) -> list[Prediction]:
    """Predictions for all `paths`, in order, `batch_size` images at a time."""
    results = []
    with tqdm(total=len(paths), unit="img", file=sys.stderr, disable=None) as bar:  # off unless a TTY
        for start in range(0, len(paths), batch_size):
            batch = paths[start:start + batch_size]
            results += classify_batch(batch, meta, run, k)
            bar.update(len(batch))
    return results


def write_csv(results: list[Prediction], k: int, f) -> None:
    """Columns path, class_1, prob_1, ..., class_k, prob_k, error."""
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(["path", *(f"{col}_{i}" for i in range(1, k + 1) for col in ("class", "prob")), "error"])
    for r in results:
        cells = [cell for name, prob in r.top for cell in (name, f"{prob:.6f}")]
        writer.writerow([r.path, *cells, *[""] * (2 * k - len(cells)), r.error or ""])


def write_json(results: list[Prediction], k: int, f) -> None:
    """A list of {"path", "top": [{"class", "prob"}, ...], "error"}."""
    rows = [{"path": r.path, "top": [{"class": c, "prob": p} for c, p in r.top], "error": r.error}
            for r in results]
    json.dump(rows, f, indent=2)
    f.write("\n")


FORMATTERS = {"csv": write_csv, "json": write_json}


def write_output(write: Callable, output: Path | None) -> None:
    """Call `write(file)` on stdout, or on a temporary file beside `output` that replaces it only once
    complete, so a failure never leaves a half-written `output`."""
    if output is None:
        write(sys.stdout)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one `error:` line from main, not argparse's usage block
        raise UsageError(message)


def positive_int(text: str) -> int:
    if not text.lstrip("+").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {text!r}")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m clipdistill.predict",
                description="Top-k classes per image from an exported student (.onnx or .pt).")
    p.add_argument("model", metavar="MODEL", help="student.onnx (onnxruntime) or a distill-stage .pt")
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="image files, folders (recursive) or globs")
    p.add_argument("--top-k", type=positive_int, default=5, metavar="K", help="classes per image (default 5)")
    p.add_argument("--format", choices=sorted(FORMATTERS), default="csv", help="default csv")
    p.add_argument("--output", type=Path, metavar="PATH", help="write here instead of stdout")
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="N",
                   help="images per batch (default 64)")
    p.add_argument("--meta", type=Path, metavar="PATH",
                   help="metadata JSON (default: MODEL with suffix .json)")
    return p.parse_args(argv)


def check_paths(args: argparse.Namespace) -> Path:
    """The model path, after checking it and --output, before any work is done."""
    model = Path(args.model)
    if model.suffix.lower() not in RUNNERS:
        raise UsageError(f"model {model}: unknown suffix (expected {' or '.join(RUNNERS)})")
    if not model.is_file():
        raise UsageError(f"model not found: {model}")
    if args.output is not None and (args.output.is_dir() or not args.output.parent.is_dir()):
        raise UsageError(f"--output {args.output}: not a file in an existing folder")
    return model


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        model = check_paths(args)
        meta = load_meta(args.meta or model.with_suffix(".json"))
        paths = expand_inputs(args.inputs)
        run = RUNNERS[model.suffix.lower()](model)
        k = min(args.top_k, len(meta.classes))
        results = classify(paths, meta, run, k, args.batch_size)
        try:
            write_output(lambda f: FORMATTERS[args.format](results, k, f), args.output)
        except OSError as exc:
            raise UsageError(f"cannot write {args.output or 'stdout'}: {exc.strerror or exc}") from None
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
