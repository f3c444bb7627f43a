"""One cache for a team: a local-directory DVC remote shared by clones of the project.

A pushes its outputs and run cache after each run it wants to share; a fresh clone pulls them and
has nothing to rerun; a teammate who runs `dvc repro --pull` with params A already ran gets every
stage from the run cache, with no stage command executed (a `python` on PATH that records any call proves it); and experiments travel
between clones with `dvc exp push` / `dvc exp pull`. Work folders (`artifacts/.*.work`) never
enter any of this.
"""
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import yaml

from project import ran_stages, run

pytestmark = pytest.mark.e2e


def tracked_outputs_clean(project: Path) -> bool:
    return "up to date" in run(["dvc", "status"], project).stdout


@pytest.fixture(scope="module")
def team(tiny_project, tmp_path_factory):
    """(A's project, git origin, DVC remote): a copy of the shared tiny project that has also run
    distill.epochs 2, pushed with its run cache, and pushed to a bare git origin."""
    root = tmp_path_factory.mktemp("team")
    a = root / "a"
    shutil.copytree(tiny_project[0], a, symlinks=True)
    remote, origin = root / "remote", root / "origin.git"
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], a)
    run(["dvc", "repro"], a)             # whatever params the shared project holds now
    committed = (a / "params.yaml").read_text()
    params = yaml.safe_load(committed)
    params["distill"]["epochs"] = 2
    (a / "params.yaml").write_text(yaml.safe_dump(params))
    run(["dvc", "repro"], a)             # a run the teammate will ask for ...
    run(["dvc", "push", "--run-cache"], a)  # ... shared: its outputs and its run record
    (a / "params.yaml").write_text(committed)
    run(["dvc", "repro"], a)             # back at the committed params (from the run cache)
    run(["git", "add", "-A"], a)
    run(["git", "commit", "-qm", "shared remote, locked outputs"], a)
    run(["dvc", "push", "--run-cache"], a)
    run(["git", "init", "-q", "--bare", str(origin)], root)
    run(["git", "remote", "add", "origin", str(origin)], a)
    run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], a)
    return a, origin, remote, params


def clone(origin: Path, dst: Path) -> Path:
    run(["git", "clone", "-q", "-b", "main", str(origin), str(dst)], dst.parent)
    return dst


def recording_python(tmp_path: Path) -> tuple[dict, Path]:
    """An environment whose `python` only records that it was called (and fails)."""
    shim_dir, marker = tmp_path / "shim", tmp_path / "python_was_called"
    shim_dir.mkdir()
    shim = shim_dir / "python"
    shim.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexit 1\n")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, DVC_NO_ANALYTICS="1",
               PATH=f"{shim_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return env, marker


def test_a_fresh_clone_pulls_everything_and_reruns_nothing(team, tmp_path):
    _, origin, remote, _ = team
    b = clone(origin, tmp_path / "b")
    run(["dvc", "pull"], b)
    assert tracked_outputs_clean(b)
    assert ran_stages(run(["dvc", "repro"], b).stdout) == []
    assert (b / "artifacts/eval/metrics.json").is_file()
    assert not list((b / "artifacts").glob(".*.work")) and not list(remote.rglob("*.work*"))


def test_a_teammate_gets_a_params_set_already_run_from_the_run_cache_without_running_a_stage(team, tmp_path):
    import subprocess

    _, origin, _, params = team
    c = clone(origin, tmp_path / "c")
    (c / "params.yaml").write_text(yaml.safe_dump(params))   # distill.epochs 2: A ran it, C never did
    env, marker = recording_python(tmp_path)
    pull = subprocess.run(["dvc", "pull", "--run-cache"], cwd=c, env=env, capture_output=True, text=True)
    assert pull.returncode == 0, pull.stderr
    # --pull: fetch the outputs of a cached run from the remote when it is not in the local cache
    proc = subprocess.run(["dvc", "repro", "--pull"], cwd=c, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not marker.exists(), f"a stage command ran: {marker.read_text()}"
    assert "is cached - skipping run" in proc.stdout or "didn't change" in proc.stdout
    history = json.loads((c / "artifacts/student/history.json").read_text())
    assert len(history) == 2  # the 2-epoch student, restored


def test_an_experiment_travels_between_clones(team, tmp_path):
    a, origin, _, _ = team
    run(["dvc", "exp", "run", "-n", "warm", "-S", "distill.temperature=2"], a)
    run(["dvc", "exp", "push", "origin", "warm"], a)
    run(["git", "checkout", "-q", "--", "params.yaml"], a)
    d = clone(origin, tmp_path / "d")
    run(["dvc", "exp", "pull", "origin", "warm"], d)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], d).stdout)
    assert "warm" in json.dumps(shown)
    run(["dvc", "exp", "apply", "warm"], d)
    run(["dvc", "checkout"], d)
    assert yaml.safe_load((d / "params.yaml").read_text())["distill"]["temperature"] == 2
    assert (d / "artifacts/student/student.pt").is_file()
