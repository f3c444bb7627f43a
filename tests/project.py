"""Helpers for tests that run the real pipeline: a committed copy of the repo, and subprocesses."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["world", "teacher", "student_clip", "generator", "prompts", "text_features", "synthesize", "distill", "evaluate",
          "export"]


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


def repo_section(dotted: str, **overrides):
    """A section of the repo's params.yaml as its validated dataclass (e.g. "prompts.mix"), with
    `overrides` replaced: the tests' stand-in for defaults, which live only in params.yaml."""
    import dataclasses

    from clipdistill.params import load_params

    obj = load_params(ROOT / "params.yaml")
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return dataclasses.replace(obj, **overrides)


TINY_CLIP = {"image_size": 16, "vision": "convnet", "embed_dim": 16, "vision_width": 8, "vision_layers": 1,
             "vision_heads": 1, "patch_size": 8, "text_width": 32, "text_layers": 1, "text_heads": 1,
             "context_length": 16}


def tiny_clip(**overrides):
    """A randomly initialised tiny embedded CLIP (conv tower unless vision="vit")."""
    from clipdistill.clip_models import build_embedded_clip

    return build_embedded_clip(**{**TINY_CLIP, **overrides})
