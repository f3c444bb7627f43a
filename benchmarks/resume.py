"""What a kill costs: a training stage run uninterrupted, then SIGKILLed at a fraction of that time
and rerun, which resumes from its last checkpoint.

    python benchmarks/resume.py                      # the generator stage of params.yaml, killed at 70 %
    python benchmarks/resume.py --stage teacher --overhead   # also: what the periodic saves cost
    python benchmarks/resume.py --steps 700 --checkpoint-every 100   # a shorter generator run

Prints the uninterrupted time, the killed run's time and the step it resumed from, whether the
resumed output is sha256-identical to the uninterrupted one, and last the ratio
`killed + resumed / uninterrupted: X.XXx` (1.0 would lose no work and pay no restart).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# stage -> its script's path arguments besides --out (world is rendered once beforehand)
STAGES = {"generator": ["stages/generator.py"], "teacher": ["stages/teacher.py"],
          "student_clip": ["stages/teacher.py", "--section", "student_clip"]}


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def digests(folder: Path) -> dict[str, str]:
    return {f.relative_to(folder).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def stage_cmd(args, params: Path, world: Path, out: Path) -> list[str]:
    return [sys.executable, *STAGES[args.stage], "--params", str(params), "--world", str(world), "--out", str(out)]


def timed_run(cmd: list[str], kill_after: float | None = None) -> tuple[float, str, bool]:
    """(seconds, output, killed): runs `cmd`, SIGKILLing it after `kill_after` seconds if given."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    killed = False
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            killed = True
    out = proc.communicate()[0]
    seconds = time.perf_counter() - start
    if not killed and proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-2000:]}")
    return seconds, out, killed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--stage", choices=sorted(STAGES), default="generator")
    parser.add_argument("--kill-at", type=float, default=0.7, help="fraction of the uninterrupted time")
    parser.add_argument("--steps", type=int, default=0, help="override generator.steps (0: keep the params')")
    parser.add_argument("--checkpoint-every", type=int, default=-1,
                        help="override the stage's checkpoint_every (-1: keep the params')")
    parser.add_argument("--overhead", action="store_true",
                        help="also run with <section>.checkpoint_every 0 (only the final save) and print the ratio")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = yaml.safe_load((ROOT / args.params).read_text())
        if args.steps:
            params["generator"]["steps"] = args.steps
        if args.checkpoint_every >= 0:
            params[args.stage]["checkpoint_every"] = args.checkpoint_every
        (tmp / "params.yaml").write_text(yaml.safe_dump(params))
        world = tmp / "world"
        subprocess.run([sys.executable, "stages/world.py", "--params", str(tmp / "params.yaml"), "--out", str(world)],
                       cwd=ROOT, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        print(f"machine: {os.cpu_count()} CPU cores ({cpu_model()}); stage "
              f"{args.stage} of {args.params}" + (f" with generator.steps {args.steps}" if args.steps else ""))
        full, _, _ = timed_run(stage_cmd(args, tmp / "params.yaml", world, tmp / "full"))
        section = params[args.stage]
        print(f"uninterrupted: {full:.1f} s (checkpoint_every {section.get('checkpoint_every')})")
        if args.overhead:
            section["checkpoint_every"] = 0
            (tmp / "once.yaml").write_text(yaml.safe_dump(params))
            once, _, _ = timed_run(stage_cmd(args, tmp / "once.yaml", world, tmp / "once"))
            print(f"uninterrupted, final save only: {once:.1f} s")
            print(f"periodic checkpoints cost: {full / once:.3f}x")
        cut, _, killed = timed_run(stage_cmd(args, tmp / "params.yaml", world, tmp / "resumed"), args.kill_at * full)
        if not killed:
            raise SystemExit("the stage finished before the kill; use a smaller --kill-at")
        rest, out, _ = timed_run(stage_cmd(args, tmp / "params.yaml", world, tmp / "resumed"))
        m = re.search(r"resuming from step (\d+) of (\d+)", out)
        resumed = f"step {m.group(1)} of {m.group(2)}" if m else "step 0 (no checkpoint was reached)"
        print(f"killed after: {cut:.1f} s; rerun: {rest:.1f} s, resumed from {resumed}")
        same = digests(tmp / "full") == digests(tmp / "resumed")
        print(f"sha256 identical to the uninterrupted output: {'yes' if same else 'NO'}")
        print(f"killed + resumed / uninterrupted: {(cut + rest) / full:.2f}x")


if __name__ == "__main__":
    main()
