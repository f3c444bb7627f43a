"""Are two runs' artifacts the same? Tensor by tensor for torch files, byte by byte for the rest.

    python -m clipdistill.compare RUN_A/artifacts RUN_B/artifacts
    python -m clipdistill.compare A B --rename teacher.pt=clip.pt --subtree state_dict

Same seed and params on the same machine must give identical artifacts; this checks it across
commits, clones or reruns. `speed.json` (machine timing) is skipped. `--subtree KEY` compares only
`blob[KEY]` of torch files that have it (model weights, when checkpoint metadata changed layout);
`--rename OLD=NEW` pairs a file of A with B's file of another name. Exit status 1 if anything
differs or is missing from B.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .runtime import load_weights

SKIPPED = {"speed.json"}  # images/s: machine- and load-dependent by nature


def differences(a, b, where: str = "") -> list[str]:
    """Paths inside two loaded torch objects at which they differ (tensors: shape, dtype, values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
        return [] if same else [where or "."]
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in one" for k in sorted(set(a) ^ set(b), key=str)]
        for k in a:
            if k in b:
                out += differences(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where or "."]


def compare(a_root: Path, b_root: Path, rename: dict[str, str], subtree: str | None) -> list[str]:
    """One line per file of `a_root` that differs from (or is missing in) `b_root`."""
    problems = []
    for a in sorted(p for p in a_root.rglob("*") if p.is_file() and p.name not in SKIPPED):
        rel = a.relative_to(a_root)
        b = b_root / rel.with_name(rename.get(rel.name, rel.name))
        if not b.is_file():
            problems.append(f"{rel}: missing in {b_root}")
        elif a.suffix == ".pt":
            x, y = load_weights(a), load_weights(b)
            if subtree and isinstance(x, dict) and subtree in x:
                x, y = x[subtree], y.get(subtree) if isinstance(y, dict) else None
            problems += [f"{rel}: differs at {d}" for d in differences(x, y)[:5]]
        elif a.read_bytes() != b.read_bytes():
            problems.append(f"{rel}: differs")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW")
    parser.add_argument("--subtree", default=None)
    args = parser.parse_args(argv)
    rename = dict(r.split("=", 1) for r in args.rename)
    problems = compare(args.a, args.b, rename, args.subtree)
    n = sum(1 for p in args.a.rglob("*") if p.is_file() and p.name not in SKIPPED)
    for line in problems:
        print(line)
    print(f"{n - len({p.split(':')[0] for p in problems})} of {n} files identical")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
