"""Parallel sweeps: two experiments queued with `dvc exp run --queue` and run by `dvc queue start -j 2`
(two DVC workers, each in its own temporary workspace) finish and appear in `dvc exp show`."""
import json
import shutil
import time

import pytest

from project import run

pytestmark = pytest.mark.e2e

QUEUE_TIMEOUT_S = 1200


def queue_states(project) -> list[str]:
    """The status word of every task `dvc queue status` lists (Queued, Running, Success, Failed)."""
    lines = run(["dvc", "queue", "status"], project).stdout.splitlines()[1:]
    return [word for line in lines for word in line.split() if word in ("Queued", "Running", "Success", "Failed")]


def test_two_queued_experiments_run_in_parallel_and_show_up(tiny_project, tmp_path):
    project = tmp_path / "q"
    shutil.copytree(tiny_project[0], project, symlinks=True)
    for name, temperature in (("queued-t2", 2.0), ("queued-t3", 3.0)):
        # threads=1: two workers on a 2-core machine, one core each
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"distill.temperature={temperature}",
             "-S", "threads=1"], project)
    assert queue_states(project) == ["Queued", "Queued"]
    run(["dvc", "queue", "start", "-j", "2"], project)
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    try:
        while set(queue_states(project)) & {"Queued", "Running"} and time.monotonic() < deadline:
            time.sleep(5)
    finally:
        run(["dvc", "queue", "stop", "--kill"], project, check=False)
    states = queue_states(project)
    assert states == ["Success", "Success"], run(["dvc", "queue", "logs", "queued-t2"], project, check=False).stdout

    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    exps = {e["name"]: e for commit in shown for e in commit.get("experiments") or []}
    for name, temperature in (("queued-t2", 2.0), ("queued-t3", 3.0)):
        rev = exps[name]["revs"][0]["data"]
        assert rev["params"]["params.yaml"]["data"]["distill"]["temperature"] == temperature
        metrics = rev["metrics"]["artifacts/eval/metrics.json"]["data"]
        assert 0.0 <= metrics["student"]["mean"] <= 1.0
        # the training curves' last values (dvclive) are experiment metrics too
        assert rev["metrics"]["artifacts/student/live/metrics.json"]["data"]["loss"] > 0
