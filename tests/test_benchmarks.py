"""The benchmark scripts on tiny params: each prints a table and ends with a figure computed from it.

Only the embedded setting: the real one builds ViT-B-32 and an f16 VQGAN, too slow for the suite.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--setting", "embedded", "--params", "tests/tiny_params.yaml", "--device", "cpu", "--threads", "1"]


def run_script(name: str, *args: str) -> list[str]:
    proc = subprocess.run([sys.executable, f"benchmarks/{name}", *TINY, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("machine: ")
    return lines


def figure(line: str, label: str) -> float:
    m = re.fullmatch(rf"{re.escape(label)}: (\d+\.\d)x", line)
    assert m, line
    return float(m.group(1))


def test_synthesis_benchmark_reports_batched_over_loop_rate():
    lines = run_script("synthesis.py", "--batch", "2", "--steps", "1", "--cutn", "1")
    rows = {ln.split()[0]: ln.split() for ln in lines if ln.split()[0] in ("batched", "loop") and ln.split()[1].isdigit()}
    # mode, calls, images/call, seconds, images*steps/s, GFLOP/s
    assert rows["batched"][1:3] == ["1", "2"] and rows["loop"][1:3] == ["2", "1"]
    ratio = float(rows["batched"][4]) / float(rows["loop"][4])
    mflop = float(next(ln for ln in lines if "MFLOP" in ln).split()[0])
    assert mflop > 0
    for row in rows.values():  # the achieved rate is the image rate times the work per image-step
        assert float(row[5]) == pytest.approx(float(row[4]) * mflop / 1e3, rel=0.02, abs=0.06)
    # The format the stage would choose here, then the ceiling in that precision: the machine's
    # dense-matmul rate over the loop's achieved rate, and the batched step's share of it.
    chosen = re.match(r"format: (fp32|bf16) (NCHW|channels-last) \(", next(ln for ln in lines if ln.startswith("format:")))
    assert chosen
    precision = chosen.group(1)
    ceiling = re.fullmatch(rf"dense {precision} matmul peak (\d+\.\d) GFLOP/s: batched at that rate would be "
                           r"(\d+\.\d)x the loop \(the most batching can give here\)", lines[-3])
    assert ceiling, lines[-3]
    peak = float(ceiling.group(1))
    assert float(ceiling.group(2)) == pytest.approx(peak / float(rows["loop"][5]), rel=0.05, abs=0.06)
    share = re.fullmatch(rf"batched step: (\d+\.\d) GFLOP/s, (\d+) % of the dense {precision} matmul rate", lines[-2])
    assert share, lines[-2]
    assert float(share.group(1)) == pytest.approx(float(rows["batched"][5]), abs=0.06)
    assert int(share.group(2)) == pytest.approx(100 * float(share.group(1)) / peak, abs=1)
    assert figure(lines[-1], "batched/loop speedup") == pytest.approx(ratio, abs=0.06)


def test_student_speed_benchmark_reports_student_over_teacher_rate():
    import torch

    from clipdistill.evaluation import count_parameters
    from clipdistill.params import load_params
    from clipdistill.students import CnnStudent

    lines = run_script("student_speed.py", "--batch", "2", "--reps", "1")
    rows = [ln for ln in lines if ln.startswith(("teacher:", "student:"))]
    # teacher, then the default student of these params (cnn), then the registry's other kinds
    assert [r.split()[1] for r in rows] == ["embedded", "CnnStudent", "PromptKD", "KDPL"]
    rates = [float(r.split()[-2]) for r in rows]
    # The CNN student's parameter count, as the distill stage would build it from these params.
    params = load_params(ROOT / "tests" / "tiny_params.yaml")
    cnn = CnnStudent(torch.randn(len(params.world.classes), params.teacher.embed_dim), 1.0,
                     head=params.distill.cnn.head, width=params.distill.cnn.width, depth=params.distill.cnn.depth,
                     backbone=params.distill.cnn.backbone)
    assert int(rows[1].split()[-4].replace(",", "")) == count_parameters(cnn)
    assert figure(lines[-1], "student/teacher speedup") == pytest.approx(rates[1] / rates[0], abs=0.06)


def test_student_speed_benchmark_puts_the_default_student_on_the_final_line(tmp_path):
    import yaml

    params = yaml.safe_load((ROOT / "tests" / "tiny_params.yaml").read_text())
    params["distill"]["student"] = "kdpl"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    lines = run_script("student_speed.py", "--params", str(path), "--batch", "2", "--reps", "1")
    rows = [ln for ln in lines if ln.startswith(("teacher:", "student:"))]
    assert [r.split()[1] for r in rows] == ["embedded", "KDPL", "CnnStudent", "PromptKD"]
    rates = [float(r.split()[-2]) for r in rows]
    assert figure(lines[-1], "student/teacher speedup") == pytest.approx(rates[1] / rates[0], abs=0.06)


def test_paired_timing_takes_turns_and_keeps_each_models_best_round(monkeypatch):
    """speed.json's images/s: the models alternate round by round and each keeps its fastest round."""
    import torch

    from clipdistill import evaluation

    calls, rates = [], iter([100.0, 50.0, 300.0, 40.0, 200.0, 60.0])

    def fake_rate(fn, image_size, device, batch=64, reps=5):
        calls.append(fn)
        return next(rates)

    monkeypatch.setattr(evaluation, "images_per_second", fake_rate)
    teacher, student = object(), object()
    best = evaluation.paired_images_per_second({"teacher": teacher, "student": student}, 32,
                                               torch.device("cpu"), rounds=3)
    assert calls == [teacher, student] * 3
    assert best == {"teacher": 300.0, "student": 60.0}


def compile_benchmark(env: dict | None = None) -> list[str]:
    proc = subprocess.run([sys.executable, "benchmarks/compile.py", "--params", "tests/tiny_params.yaml", "--device", "cpu",
                           "--threads", "1", "--steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("machine: ")
    assert re.fullmatch(r"format: (fp32|bf16) (NCHW|channels-last) \(as the generator stage chooses it\)", lines[1])
    assert re.fullmatch(r"eager: \d+\.\d ms per step", lines[2])
    return lines


def test_compile_benchmark_without_a_cxx_compiler_times_eager_only(tmp_path):
    """No g++, clang++ or $CXX on PATH: it says so and stops after the eager step."""
    import os

    (tmp_path / "bin").mkdir()
    os.symlink(sys.executable, tmp_path / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    env["PATH"] = str(tmp_path / "bin")
    lines = compile_benchmark(env)
    assert lines[3:] == ["compile: no C++ compiler found (g++, clang++ or $CXX), so inductor cannot build; eager only"]


def test_compile_benchmark_figure_is_the_stages_steps_times_the_step_gain_less_the_one_time_cost():
    """Needs a C++ compiler, as inductor does (.ci/run installs g++); the test above covers none."""
    from clipdistill.params import load_params

    lines = compile_benchmark()
    assert lines[3].startswith("compile: inductor builds with ")
    m = re.fullmatch(r"compiled: (\d+\.\d) ms per step \((\d+\.\d\d)x eager\), after a one-time (\d+\.\d) s", lines[4])
    assert m, lines[4]
    eager = float(re.match(r"eager: (\d+\.\d)", lines[2]).group(1))
    compiled, speedup, cost = float(m.group(1)), float(m.group(2)), float(m.group(3))
    assert speedup == pytest.approx(eager / compiled, abs=0.02)
    steps = load_params(ROOT / "tests" / "tiny_params.yaml").generator.steps
    final = re.fullmatch(rf"compile over {steps} generator steps: (saves|costs) (\d+) s", lines[5])
    assert final, lines[5]
    net = float(final.group(2)) * (1 if final.group(1) == "saves" else -1)
    assert net == pytest.approx(steps * (eager - compiled) / 1e3 - cost, abs=1.0)


def test_synthesis_ops_benchmark_reports_each_speedup_from_its_table():
    lines = run_script("synthesis_ops.py", "--batch", "2", "--steps", "1", "--cutn", "1", "--rounds", "1")
    rows = {}
    for ln in lines:
        m = re.fullmatch(r"(as run|torch GroupNorm|x\*sigmoid\(x\)|ReLU then pool|NaN-filled)\s+(\d+\.\d)\s+(\d+\.\d)",
                         ln)
        if m:
            rows[m.group(1)] = float(m.group(2))
    assert set(rows) == {"as run", "torch GroupNorm", "x*sigmoid(x)", "ReLU then pool", "NaN-filled"}
    assert any(ln.startswith("GroupNorm(") and "ours channels-last" in ln for ln in lines)
    m = re.fullmatch(r"speed-up over torch GroupNorm, x\*sigmoid\(x\), ReLU then pool, NaN-filled: "
                     r"(\d+\.\d\d)x, (\d+\.\d\d)x, (\d+\.\d\d)x, (\d+\.\d\d)x", lines[-1])
    assert m, lines[-1]
    for got, name in zip(m.groups(), ("torch GroupNorm", "x*sigmoid(x)", "ReLU then pool", "NaN-filled")):
        assert float(got) == pytest.approx(rows[name] / rows["as run"], abs=0.02)


def test_clip_step_benchmark_reports_each_speedup_from_its_rows():
    lines = run_script("clip_step.py", "--steps", "2", "--rounds", "1", "--batch", "4")
    fastest = {}
    for ln in lines:
        m = re.fullmatch(r"(teacher|student_clip) (as run|whole table|NaN-filled): fastest (\d+\.\d) ms/step .*", ln)
        if m:
            fastest[m.group(1), m.group(2)] = float(m.group(3))
    assert len(fastest) == 6
    m = re.fullmatch(r"speed-up over whole table, NaN-filled: teacher (\d+\.\d\d)x, (\d+\.\d\d)x; "
                     r"student_clip (\d+\.\d\d)x, (\d+\.\d\d)x", lines[-1])
    assert m, lines[-1]
    got = iter(m.groups())
    for name in ("teacher", "student_clip"):
        for variant in ("whole table", "NaN-filled"):
            assert float(next(got)) == pytest.approx(fastest[name, variant] / fastest[name, "as run"], rel=0.05)
