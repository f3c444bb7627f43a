"""The per-stage time table and the distill-seed sweep, run on the shared tiny pipeline's copy."""
import re
import shutil
import sys

import pytest
import yaml

from project import run


def test_stage_times_prints_a_row_per_stage_that_ran_and_the_total(tiny_project, tmp_path):
    project = tmp_path / "proj"
    shutil.copytree(tiny_project[0], project, symlinks=True)
    out = run([sys.executable, "benchmarks/stage_times.py", "--repo", str(project), "--single-item", "distill",
               "evaluate"], project).stdout.splitlines()
    assert out[0].startswith("machine: ") and "family" in out[0]  # the CPU model is named
    rows = [line for line in out if re.fullmatch(r"\| \w+ \| \d+ \|", line)]
    assert [r.split()[1] for r in rows] == ["distill", "evaluate"]  # only what ran, in order
    # the distill loop(s) the stage logged: chosen format and achieved rate (tiny params: base-to-novel too)
    loops = [line.split(" | ") for line in out if line.startswith("| distill | distill (")]
    assert len(loops) == 2 and all(re.fullmatch(r"(fp32|bf16) (NCHW|channels-last)", r[2]) for r in loops)
    for _, _, _, steps, gflop, seconds, rate in loops:
        assert int(steps) > 0 and float(gflop) > 0
        # rate x seconds = the loop's GFLOP, up to the printed digits
        assert float(rate.rstrip(" |")) * float(seconds) == pytest.approx(int(steps) * float(gflop), rel=0.1, abs=0.1)
    assert re.fullmatch(r"dvc repro: \d+ min \d\d s, peak memory \d+\.\d\d GB", out[-1])
    assert float(out[-1].split()[-2]) > 0.1  # the stages' own memory was sampled, not only dvc's


def test_distill_seed_sweep_varies_only_seed_and_overrides_and_reuses_finished_runs(tiny_project, tmp_path):
    project = tmp_path / "proj"
    shutil.copytree(tiny_project[0], project, symlinks=True)
    cmd = [sys.executable, "experiments/distill_seeds.py", "--seeds", "0,1", "--runs", "kl=distill.loss=kl",
           "l2=distill.loss=feature_l2,distill.feature_kl_weight=0.5"]
    first = run(cmd, project).stdout
    assert first.count("== ") == 4  # two runs x two seeds, each distilled and evaluated
    table = [line for line in first.splitlines() if line.startswith("| kl |") or line.startswith("| l2 |")]
    assert len(table) == 2 and all("±" in line for line in table)
    base = yaml.safe_load((project / "params.yaml").read_text())
    swept = yaml.safe_load((project / "artifacts/sweeps/l2/seed1/params.yaml").read_text())
    assert swept["seed"] == 1 and swept["distill"]["loss"] == "feature_l2"
    assert swept["distill"]["feature_kl_weight"] == 0.5 and swept["distill"]["base_to_novel"] is False
    for section in base:
        if section not in ("seed", "distill"):
            assert swept[section] == base[section]
    assert (project / "artifacts/sweeps/l2/seed0/eval/metrics.json").is_file()
    again = run(cmd, project).stdout
    assert "== " not in again and [l for l in again.splitlines() if l.startswith("| kl |")] == table[:1]
