"""Turn `dvc exp show --json` into a markdown table of experiments.

    dvc exp show --json | python -m clipdistill.report            # one row per experiment
    dvc exp show --json | python -m clipdistill.report --by prompts.method
    dvc exp show --json | python -m clipdistill.report --students   # students x image sources
    python -m clipdistill.report --by prompts.method seed0.json seed1.json seed2.json   # over seeds
    python -m clipdistill.report --against vanilla seed0.json seed1.json seed2.json     # + leads per seed

With several files (one `dvc exp show --json` per whole-pipeline seed, as
experiments/prompts_seeds.sh writes them), the rows of equal `--by` value and student are pooled
across files: each cell is the mean ± (max - min) / 2 over the seeds, and `seeds` counts them.
`--against VALUE` adds the paired comparison: each row's mean and worst domain per seed, and its
lead over the row of `--by` VALUE and the same student in the same seed, per seed and pooled.

Columns: the swept param (`--by`), student accuracy per evaluation domain, mean, worst domain,
prompt diversity and image diversity (mean pairwise cosine distance of the prompts' text features
and of the synthesized images' teacher features). Works with DVC 3's JSON layout: a list of
commits, each with `data` (params, metrics) and `experiments` whose `revs` hold the same.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

METRICS = "artifacts/eval/metrics.json"
PROMPT_METRICS = "artifacts/prompts/metrics.json"
SYNTH_METRICS = "artifacts/synth/metrics.json"
SPEED = "artifacts/eval/speed.json"


def _files(block: dict | None) -> dict:
    """{file: its data} from a DVC params/metrics block ({file: {"data": {...}}})."""
    return {name: (entry or {}).get("data") or {} for name, entry in (block or {}).items()}


def _get(tree: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def experiments(show: list) -> list[dict]:
    """Flatten `dvc exp show --json` into [{name, rev, params, metrics}] for every experiment
    (and baseline commit) that has evaluation metrics."""
    rows = []

    def add(entry: dict, name: str | None):
        data = entry.get("data") or {}
        metrics = _files(data.get("metrics"))
        if METRICS not in metrics or not metrics[METRICS]:
            return
        params = _files(data.get("params")).get("params.yaml", {})
        rows.append({"name": name or entry.get("name") or data.get("rev", "")[:7] or entry.get("rev", ""),
                     "rev": data.get("rev", entry.get("rev")), "params": params, "metrics": metrics})

    for commit in show:
        add(commit, commit.get("name") or commit.get("rev"))
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                add(rev, rev.get("name") or exp.get("name"))
    # `dvc exp run` applies the last experiment's results to the workspace, whose params.yaml the
    # experiment scripts then reset: next to experiments, its row would pair one run's metrics
    # with another's params.
    runs = [r for r in rows if "workspace" not in (r["name"], r["rev"])]
    return runs or rows


def table(rows: list[dict], by: str = "prompts.method") -> str:
    """Markdown: one line per experiment, domains in the order metrics.json lists them."""
    if not rows:
        raise ValueError(f"no experiment has {METRICS}; run `dvc exp run` first")
    domains = [d for d in rows[0]["metrics"][METRICS]["student"] if d != "mean"]
    head = [by, "experiment", *domains, "mean", "worst", "prompt div.", "image div."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        student = r["metrics"][METRICS]["student"]
        accs = [student.get(d) for d in domains]
        prompt_div = _get(r["metrics"].get(PROMPT_METRICS, {}), "prompt_diversity.mean")
        image_div = _get(r["metrics"].get(SYNTH_METRICS, {}), "image_diversity.mean")
        cells = [str(_get(r["params"], by)), r["name"], *(f"{a:.3f}" for a in accs), f"{student['mean']:.3f}",
                 f"{min(accs):.3f}", *("-" if v is None else f"{v:.3f}" for v in (prompt_div, image_div))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_spread(values: list[float], signed: bool = False) -> str:
    """mean ± (max - min) / 2, the project's seed-spread convention (docs/results.md); `signed`
    writes the mean's sign (leads)."""
    mean = sum(values) / len(values)
    return f"{mean:{'+' if signed else ''}.3f} ± {(max(values) - min(values)) / 2:.3f}"


def _by_seed(runs: list[list[dict]], by: str) -> dict[tuple[str, str], dict[int, dict]]:
    """{(``by`` value, distill.student): {seed index: its run}}, keys in first-seen order, each seed
    counted once per key (its first row: a seed's baseline and its experiment of the same params are
    one run)."""
    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for k, rows in enumerate(runs):
        for r in rows:
            key = (str(_get(r["params"], by)), str(_get(r["params"], "distill.student")))
            groups.setdefault(key, {}).setdefault(k, r)
    return groups


def _mean_worst(run: dict) -> tuple[float, float]:
    student = run["metrics"][METRICS]["student"]
    return student["mean"], min(v for d, v in student.items() if d != "mean")


def seed_table(runs: list[list[dict]], by: str = "prompts.method") -> str:
    """Markdown pooling several seeds' experiments: ``runs`` holds one ``experiments()`` list per seed.
    One line per (``by`` value, distill.student), in first-seen order; every cell is mean ± half-range
    over the seeds that ran it, each seed counted once (its first row of that key). The worst domain
    is taken per seed, then pooled."""
    groups = {key: list(seeds.values()) for key, seeds in _by_seed(runs, by).items()}
    if not groups:
        raise ValueError(f"no experiment has {METRICS}; run `dvc exp run` first")
    first = next(iter(groups.values()))[0]
    domains = [d for d in first["metrics"][METRICS]["student"] if d != "mean"]
    head = [by, "student", "seeds", *domains, "mean", "worst", "prompt div.", "image div."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (value, student), rows in groups.items():
        accs = [r["metrics"][METRICS]["student"] for r in rows]
        divs = [[_get(r["metrics"].get(f, {}), key) for r in rows]
                for f, key in ((PROMPT_METRICS, "prompt_diversity.mean"), (SYNTH_METRICS, "image_diversity.mean"))]
        cells = [value, student, str(len(rows)), *(mean_spread([a[d] for a in accs]) for d in domains),
                 mean_spread([a["mean"] for a in accs]), mean_spread([min(a[d] for d in domains) for a in accs]),
                 *("-" if None in v else mean_spread(v) for v in divs)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lead_table(runs: list[list[dict]], by: str, against: str, labels: list[str]) -> str:
    """Markdown, the paired comparison over seeds: per (``by`` value, student), the mean and, in
    brackets, the worst domain of each seed (``labels`` name the seeds), then its lead over the
    ``against`` row of the same student, per seed and as mean ± half-range over the seeds that ran
    both. A lead smaller than its spread is no finding (docs/results.md)."""
    groups = _by_seed(runs, by)
    if not any(value == against for value, _ in groups):
        raise ValueError(f"no experiment has {by} = {against}")
    head = [by, "student", *labels, f"lead over {against}: mean", "lead: worst domain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def leads(values: list[float]) -> str:
        return f"{mean_spread(values, signed=True)} ({' / '.join(f'{v:+.3f}' for v in values)})"

    for (value, student), seeds in groups.items():
        cells = [value, student]
        cells += [("%.3f (%.3f)" % _mean_worst(seeds[k])) if k in seeds else "-" for k in range(len(runs))]
        base = groups.get((against, student), {})
        both = [k for k in range(len(runs)) if k in seeds and k in base]
        if value == against or not both:
            cells += ["-", "-"]
        else:
            pairs = [(_mean_worst(seeds[k]), _mean_worst(base[k])) for k in both]
            cells += [leads([a[0] - b[0] for a, b in pairs]), leads([a[1] - b[1] for a, b in pairs])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def student_table(rows: list[dict]) -> str:
    """Markdown for the students comparison: one line per experiment (distill.student x
    distill.images) plus the smaller CLIP's zero-shot line, with mean and worst-domain accuracy,
    base / novel / HM, parameters, GFLOPs and speed relative to the teacher."""
    if not rows:
        raise ValueError(f"no experiment has {METRICS}; run `dvc exp run` first")
    head = ["student", "images", "experiment", "mean", "worst", "base", "novel", "HM", "params", "GFLOPs",
            "speed vs teacher"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    def line(student, images, name, acc, b2n, speed):
        domains = [v for k, v in acc.items() if k != "mean"]
        cells = [student, images, name, fmt(acc.get("mean")), fmt(min(domains) if domains else None),
                 *(fmt((b2n or {}).get(k)) for k in ("base", "novel", "hm")),
                 fmt((speed or {}).get("parameters"), ","), fmt((speed or {}).get("gflops_per_image"), ".4f"),
                 fmt((speed or {}).get("speedup"), ".2f")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")

    zero_shot = next((r for r in rows if "student_zero_shot" in r["metrics"][METRICS]), None)
    if zero_shot is not None:
        line("zero-shot smaller CLIP", "-", zero_shot["name"], zero_shot["metrics"][METRICS]["student_zero_shot"],
             None, None)
    for r in rows:
        m, speed = r["metrics"][METRICS], r["metrics"].get(SPEED, {})
        student_speed = dict(speed.get("student", {}), speedup=speed.get("student_speedup"))
        line(str(_get(r["params"], "distill.student")), str(_get(r["params"], "distill.images")), r["name"],
             m["student"], m.get("base_to_novel"), student_speed)
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="*", help="file(s) with `dvc exp show --json` output, one per seed (default: stdin)")
    ap.add_argument("--by", default="prompts.method", help="dotted params key shown first")
    ap.add_argument("--against", metavar="VALUE", help="with several files: each row's lead over the row of "
                    "this --by value, per seed (e.g. vanilla)")
    ap.add_argument("--students", action="store_true", help="the students table (docs/results.md, prompt-learning students)")
    args = ap.parse_args(argv)
    texts = [open(path).read() for path in args.json] if args.json else [sys.stdin.read()]
    try:
        runs = [experiments(json.loads(text)) for text in texts]
        if args.against is not None and len(runs) < 2:
            raise ValueError("--against pairs seeds: give two or more `dvc exp show --json` files")
        if len(runs) > 1:
            if args.students:
                raise ValueError("--students reads one `dvc exp show --json`; pool seeds with --by")
            print(seed_table(runs, args.by))
            if args.against is not None:
                labels = [pathlib.Path(path).stem for path in args.json]
                print("\n" + lead_table(runs, args.by, args.against, labels))
        else:
            print(student_table(runs[0]) if args.students else table(runs[0], args.by))
    except (ValueError, KeyError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
