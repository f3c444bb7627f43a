"""Kill -9 matrix, end to end: SIGKILL each long stage inside its loop, after its second
checkpoint, and rerun `dvc repro`. Finished stages never rerun, the killed stage resumes from its
checkpoint (not step 0), and every artifact ends sha256-identical to an uninterrupted run's.

One chain of runs covers all five stages: run 1 is killed in `teacher`; run 2 resumes it and is
killed in `student_clip`; ... run 6 resumes `distill` and finishes. Tiny params with loops long
enough (a few seconds) that the kill lands inside them.
"""
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from project import ROOT, committed_copy, ran_stages, run

pytestmark = pytest.mark.e2e

EVERY = 5
# stage -> (its `--out`, its work folder, glob of its checkpoints, how far the 2nd checkpoint is)
KILLS = {
    "teacher": ("artifacts/teacher", "artifacts/.teacher.work", "*/step_*.pt", 2 * EVERY),
    "student_clip": ("artifacts/student_clip", "artifacts/.student_clip.work", "*/step_*.pt", 2 * EVERY),
    "generator": ("artifacts/generator", "artifacts/.generator.work", "*/step_*.pt", 2 * EVERY),
    "synthesize": ("artifacts/synth", "artifacts/.synth.work", "*/shard_*.tar", 2),
    "distill": ("artifacts/student", "artifacts/.student.work", "*/student/*/step_*.pt", 2 * EVERY),
}


def kill_params(tmp_path: Path) -> Path:
    """tests/tiny_params.yaml with loops of a few seconds and a checkpoint every EVERY steps."""
    p = yaml.safe_load((ROOT / "tests" / "tiny_params.yaml").read_text())
    p["teacher"].update(epochs=60, checkpoint_every=EVERY)           # 3 steps an epoch
    p["student_clip"].update(epochs=60, checkpoint_every=EVERY)
    p["generator"].update(steps=300, checkpoint_every=EVERY)
    p["prompts"]["per_class"] = 8                                     # 24 prompts, 6 shards of 4
    p["synthesize"].update(steps=40)
    p["distill"].update(epochs=25, checkpoint_every=EVERY)            # 8 steps an epoch
    path = tmp_path / "kill_params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def artifact_hashes(root: Path) -> dict[str, str]:
    """sha256 of every artifact but speed.json (images/s: timing, not a result)."""
    return {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted((root / "artifacts").rglob("*")) if f.is_file() and f.name != "speed.json"}


def stage_pids(project: Path, out: str) -> list[int]:
    """PIDs of python processes running a stage script with `--out <out>` in `project`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        words = [w.decode(errors="replace") for w in cmd]
        if cwd == str(project) and any(w.startswith("stages/") for w in words) and out in words:
            pids.append(int(proc.name))
    return pids


def repro_killed_in(project: Path, stage: str) -> str:
    """`dvc repro`, SIGKILLing `stage`'s process once its work folder holds its second checkpoint."""
    out, work, pattern, second = KILLS[stage]
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONPATH=str(project))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.Popen(["dvc", "repro"], cwd=project, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def reached() -> bool:
        files = list((project / work).glob(pattern))
        if pattern.endswith("shard_*.tar"):
            return len(files) >= second
        return any(int(re.search(r"step_(\d+)", f.name).group(1)) >= second for f in files)

    killed = False
    while proc.poll() is None:
        if reached():
            pids = stage_pids(project, out)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed = bool(pids)
            break
        time.sleep(0.005)
    output = proc.communicate()[0]
    assert killed, f"{stage} finished before it could be killed:\n{output[-2000:]}"
    assert proc.returncode != 0
    return output


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    dst = committed_copy(tmp / "proj", kill_params(tmp))
    run(["dvc", "repro"], dst)
    return artifact_hashes(dst)


def test_every_long_stage_killed_in_its_loop_resumes_to_identical_artifacts(tmp_path, uninterrupted):
    (tmp_path / "proj").mkdir()
    dst = committed_copy(tmp_path / "proj", kill_params(tmp_path))
    order = list(KILLS)
    previous = None
    for stage in order + [None]:
        if stage is None:
            output = run(["dvc", "repro"], dst).stdout
        else:
            output = repro_killed_in(dst, stage)
        ran = ran_stages(output)
        if previous is not None:
            # the stage killed last time reruns first: nothing that had finished before it reruns
            assert ran[0] == previous, ran
            if previous == "synthesize":
                done = int(re.search(r"(\d+) already done", output).group(1))
                assert done >= KILLS[previous][3], output[-2000:]
            else:
                step = int(re.search(r"resuming from step (\d+)", output).group(1))
                assert step >= KILLS[previous][3], output[-2000:]
        if stage is not None:
            assert ran[-1] == stage, ran
        previous = stage
    assert artifact_hashes(dst) == uninterrupted
    assert not list((dst / "artifacts").glob(".*.work")), "work folders go away on success"
    assert "up to date" in run(["dvc", "status"], dst).stdout
