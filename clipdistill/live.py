"""Training curves as dvclive logs inside a stage's output: `dvc plots show` draws them and
`dvc exp show` lists their final values.

A loop's curves are written once it has finished, from its per-step history (losses, and learning
rates from its schedule), so a run resumed after a kill writes the same log as an uninterrupted
one, and the same seed writes the same files (no timestamps).
"""
from __future__ import annotations

from pathlib import Path

LIVE_DIR = "live"  # <stage output>/live: metrics.json (final values), plots/metrics/<name>.tsv


MAX_POINTS = 500  # points per curve: a 4,800-step loop is logged as 480 means of 10 steps


def write_curves(folder: Path, curves: dict[str, list[float]], max_points: int = MAX_POINTS) -> None:
    """dvclive's layout in `folder` for `curves` {name: one value per step, all the same length}:
    plots/metrics/<name>.tsv (step, value) and metrics.json (the last values). A loop longer than
    `max_points` steps is logged as means over windows of ceil(steps / max_points) steps, each at
    the count of steps done by its end."""
    from dvclive import Live

    lengths = {len(values) for values in curves.values()}
    if len(lengths) != 1:
        raise ValueError(f"curves of different lengths: { {k: len(v) for k, v in curves.items()} }")
    (n,) = lengths
    window = max(1, -(-n // max_points))
    folder.mkdir(parents=True, exist_ok=True)
    with Live(str(folder), save_dvc_exp=False, dvcyaml=False, report=None) as live:
        for start in range(0, n, window):
            end = min(start + window, n)
            live.step = end
            for name, values in curves.items():
                live.log_metric(name, sum(float(v) for v in values[start:end]) / (end - start))
            live.next_step()


def scheduled_lrs(base_lr: float, factor, steps: int) -> list[float]:
    """The learning rate of each step under LambdaLR(`factor`): base_lr * factor(step)."""
    return [base_lr * factor(step) for step in range(steps)]
