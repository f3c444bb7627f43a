"""benchmarks/gpu.sh --dry-run: every step of the GPU figures at tiny size on the CPU, one line each.

It runs every stage of the pipeline on tests/tiny_params.yaml (a few minutes on 2 cores), hence
the e2e mark. While benchmarks/loader_speed.py does not exist the script must say so
and fail, and that must be its only failure; once the file exists its figure is demanded too.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOADER_MISSING = "loader_speed: benchmarks/loader_speed.py missing"

pytestmark = pytest.mark.e2e


def test_gpu_script_dry_run_prints_every_figure(tmp_path):
    loader_exists = (ROOT / "benchmarks" / "loader_speed.py").is_file()
    env = dict(os.environ, PYTHON=sys.executable, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", "--out", str(tmp_path / "gpu")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    lines = proc.stdout.strip().splitlines()

    assert len(lines) == 6, report  # the machine, then one line per figure
    assert lines[0].startswith("machine: cpu (dry run)"), report
    for line, precision in zip(lines[1:3], ("fp32", "bf16")):
        assert re.fullmatch(rf"synthesis {precision}: batched/loop speedup: \d+\.\dx \(batched \d+\.\d\d vs loop "
                            rf"\d+\.\d\d images\*steps/s; 2 images of \d+ px, 1 steps, 1 cutouts of \d+ px\)", line), report
    assert lines[4] == "torchrun synthesis 2 processes == 1 process: yes", report
    assert lines[5] == "pipeline on cpu, every stage: yes", report
    assert not any("FAILED" in line for line in lines), report

    if loader_exists:
        assert proc.returncode == 0, report
        assert lines[3].startswith("loader_speed: ") and lines[3] != LOADER_MISSING, report
    else:  # the only failure is the loader step's missing file
        assert proc.returncode == 1, report
        assert lines[3] == LOADER_MISSING, report
        assert proc.stderr.strip().splitlines()[-1] == "gpu.sh: failed: loader_speed", report

    # Both synthesis outputs were compared file by file (every file, whatever the shards' format),
    # and the 2-process run did split the work.
    logs = tmp_path / "gpu" / "logs"
    one = (logs / "sha256_1p.txt").read_text().splitlines()
    assert len(one) > 3 and one == (logs / "sha256_2p.txt").read_text().splitlines()  # 3 shards at least
    assert "rank 1/2" in (logs / "torchrun_2p.log").read_text()
    # The stages after synthesize ran on its output: the exported student is there.
    pipeline = tmp_path / "gpu" / "pipeline"
    assert (pipeline / "artifacts" / "eval" / "metrics.json").is_file(), report
    assert any((pipeline / "artifacts" / "export").iterdir()), report
