"""Seconds per stage of one `dvc repro`, and the peak memory of the run: the per-stage time table.

Runs `dvc repro` (by default with `--force`, so every stage runs whatever the cache holds) in a
checkout, stamps each "Running stage" line DVC prints, and prints one row per stage that ran, the
total wall clock and the peak memory (PSS of `dvc` and every process under it, sampled every
0.5 s, shared pages counted once). Stage output is written to `--log` (default: a temp file).
A second table lists the training and synthesis loops the stages logged: the precision and memory
format each chose (clipdistill/formats.py), its steps, GFLOP per step (convolutions and matmuls,
forward and backward) and the GFLOP/s it achieved over the loop's own seconds.

  python benchmarks/stage_times.py                       # this checkout, every stage
  python benchmarks/stage_times.py --repo /tmp/clone     # another checkout (e.g. an older commit)
  python benchmarks/stage_times.py --no-force evaluate   # only what is stale, up to `evaluate`
  python benchmarks/stage_times.py --single-item distill evaluate   # just those two stages

The last line is the figure: `dvc repro: N min S s, peak memory X.XX GB`.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

RUNNING = re.compile(r"^Running stage '([^']+)'")
# The stages' log lines of clipdistill.formats: `<loop>: <format> (why)` and `formats.loop_rate`'s line.
FORMAT = re.compile(r"^([\w ]+): ((?:fp32|bf16) (?:NCHW|channels-last)) \(")
RATE = re.compile(r"^(.+?) loop: (\d+) steps of ([\d.e+-]+) GFLOP in ([\d.]+) s: ([\d.]+) GFLOP/s$")


def cpu_model() -> str:
    """The CPU's model name and its bf16 matrix features, from /proc/cpuinfo (Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    fields: dict[str, str] = {}
    for line in info.splitlines():  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name, family, flags = fields.get("model name", "?"), fields.get("cpu family", "?"), set(fields.get("flags", "").split())
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} (family {family}; {', '.join(bf16) or 'no native bf16'})"


class TreePeak:
    """Peak PSS of a process and all its descendants, sampled on a thread."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.root, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for proc in procs:
                try:
                    total += proc.memory_full_info().pss
                except psutil.Error:  # exited between listing and reading
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", help="dvc repro targets (default: the whole pipeline)")
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="checkout to run in")
    parser.add_argument("--no-force", action="store_true", help="run only the stale stages (no --force)")
    parser.add_argument("--single-item", action="store_true", help="only the targets, not their upstream stages")
    parser.add_argument("--log", help="where the stages' output goes (default: a temp file)")
    args = parser.parse_args()
    repo = Path(args.repo).resolve()
    log_path = Path(args.log) if args.log else Path(tempfile.mkstemp(prefix="stage_times_", suffix=".log")[1])
    cmd = ["dvc", "repro", *([] if args.no_force else ["--force"]), *(["--single-item"] if args.single_item else []),
           *args.targets]
    # The checkout's own package first, whatever another clone's editable install points at.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}, {psutil.virtual_memory().total / 2**30:.0f} GB RAM")
    print(f"running `{' '.join(cmd)}` in {repo}; stage output: {log_path}", flush=True)
    stamps: list[tuple[str, float]] = []
    loops: list[list[str]] = []  # stage, loop, format, steps, GFLOP per step, seconds, GFLOP/s
    chosen: dict[str, str] = {}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        peak = TreePeak(proc.pid)
        for line in proc.stdout:
            log.write(line)
            match = RUNNING.match(line)
            if match:
                now = time.perf_counter()
                if stamps:
                    print(f"  {stamps[-1][0]}: {now - stamps[-1][1]:.0f} s", flush=True)
                stamps.append((match.group(1), now))
            if (fmt := FORMAT.match(line)) is not None:
                chosen[fmt.group(1)] = fmt.group(2)
            if (rate := RATE.match(line.rstrip())) is not None and stamps:
                loop = rate.group(1)
                loops.append([stamps[-1][0], loop, chosen.get(loop.split(" (")[0], "?"), *rate.groups()[1:]])
        code = proc.wait()
        peak_bytes = peak.stop()
    end = time.perf_counter()
    if code:
        sys.exit(f"dvc repro failed (exit {code}); see {log_path}")
    print("\n| stage | seconds |\n|---|---|")
    for (name, t0), (_, t1) in zip(stamps, [*stamps[1:], ("", end)]):
        print(f"| {name} | {t1 - t0:.0f} |")
    if loops:
        print("\n| stage | loop | format | steps | GFLOP per step | loop seconds | GFLOP/s |\n|---|---|---|---|---|---|---|")
        for row in loops:
            print(f"| {' | '.join(row)} |")
    print(f"\ndvc repro: {minutes(end - start)}, peak memory {peak_bytes / 2**30:.2f} GB")


if __name__ == "__main__":
    main()
