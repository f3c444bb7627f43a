"""Helpers for tests that run the real pipeline: a committed copy of the repo, and subprocesses."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["world", "teacher", "student_clip", "generator", "prompts", "text_features", "synthesize", "distill", "evaluate"]


def run(cmd, cwd, check=True):
    """Run `cmd` in `cwd` with this interpreter's tools first on PATH and the copy's package importable."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t", PYTHONPATH=str(cwd))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, shell=isinstance(cmd, str))
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def ran_stages(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def committed_copy(dst: Path, params: Path) -> Path:
    """The repo's tracked and unignored files copied to `dst` with `params` as params.yaml, committed
    to a fresh git repository (DVC experiments need a commit)."""
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], ROOT).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    shutil.copy(params, dst / "params.yaml")
    run(["git", "init", "-q"], dst)
    run(["git", "add", "-A"], dst)
    run(["git", "commit", "-qm", "project"], dst)
    return dst
