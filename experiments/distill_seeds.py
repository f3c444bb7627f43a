"""Distill-only sweeps over seeds: the same teacher and synthesized images, several distill settings,
each trained and evaluated with 3 (or more) seeds, then mean and spread per evaluation domain.

Run from the repo root after `dvc repro` (it reads the default's artifacts and never rewrites them).
Each run writes `artifacts/sweeps/<name>/seed<k>/{student,eval}` with a params file that differs
from `params.yaml` only in `seed` (which seeds distill's initialisation, order and augmentation
here: the upstream artifacts are fixed) and the run's `-S key=value` overrides. The seed
spread this measures is therefore distill's alone, not the whole pipeline's (teacher training and
synthesis seeded too), which is larger. Base-to-novel is off: it trains a second student that
none of these figures read.

  python experiments/distill_seeds.py                           # the feature-loss rows (kl, feature_l2, ...)
  python experiments/distill_seeds.py --seeds 0,1,2 --runs "kl=distill.loss=kl" "l2=distill.loss=feature_l2"

A run already on disk (its metrics.json present) is not redone. The table goes to stdout.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, not another clone's editable install

from clipdistill.report import mean_spread  # noqa: E402

ART = ROOT / "artifacts"

# name = comma-separated key=value overrides of params.yaml
FEATURE_LOSS_RUNS = [
    "kl=distill.loss=kl",
    "feature_l2=distill.loss=feature_l2",
    "feature_cosine=distill.loss=feature_cosine",
    "feature_l2+kl=distill.loss=feature_l2,distill.feature_kl_weight=1.0",
]


def with_overrides(params: dict, overrides: dict) -> dict:
    out = json.loads(json.dumps(params))
    for key, value in overrides.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        if last not in node:
            sys.exit(f"params key {key!r} does not exist")
        node[last] = value
    return out


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}")


def one(name: str, overrides: dict, seed: int, base: dict) -> dict:
    out = ART / "sweeps" / name / f"seed{seed}"
    metrics = out / "eval" / "metrics.json"
    if not metrics.is_file():
        out.mkdir(parents=True, exist_ok=True)
        params = with_overrides(base, {**overrides, "seed": seed, "distill.base_to_novel": False})
        params_file = out / "params.yaml"
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        common = ["--params", str(params_file), "--world", str(ART / "world"), "--teacher", str(ART / "teacher"),
                  "--student_clip", str(ART / "student_clip"), "--text_features", str(ART / "text_features")]
        print(f"== {name} seed {seed}", flush=True)
        run([sys.executable, "stages/distill.py", "--synth", str(ART / "synth"), *common, "--out", str(out / "student")])
        run([sys.executable, "stages/evaluate.py", *common, "--student", str(out / "student"), "--out", str(out / "eval")])
    metrics = json.loads(metrics.read_text())
    # The validation split (world.val_styles) is what a choice between runs is made on.
    return {**metrics["student"], **({"val": metrics["val"]["student"]["mean"]} if "val" in metrics else {})}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", nargs="+", default=FEATURE_LOSS_RUNS,
                        help="name=key=value[,key=value...] per run")
    args = parser.parse_args()
    if not (ART / "teacher" / "clip.pt").is_file() or not (ART / "synth").is_dir():
        sys.exit("run `dvc repro` first: the sweep reads artifacts/teacher, artifacts/synth and the rest")
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for spec in args.runs:
        name, _, rest = spec.partition("=")
        overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in rest.split(",") if item)}
        per_seed = [one(name, overrides, seed, base) for seed in seeds]
        rows.append((name, per_seed))
    domains = [d for d in rows[0][1][0] if d not in ("mean", "val")] + ["mean"]
    shown = domains + (["val"] if all("val" in m for _, per_seed in rows for m in per_seed) else [])
    print(f"\nstudent accuracy, mean ± spread (max - min) / 2 over seeds {args.seeds}\n")
    print("| run | " + " | ".join(shown) + " | worst domain |")
    print("|---|" + "---|" * (len(shown) + 1))
    for name, per_seed in rows:
        cells = []
        for d in shown:
            values = [m[d] for m in per_seed]
            cells.append(mean_spread(values))
        worst = [min(m[d] for d in domains[:-1]) for m in per_seed]
        cells.append(f"{statistics.mean(worst):.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
