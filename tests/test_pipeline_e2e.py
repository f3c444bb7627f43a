"""End to end: copy the repo to a temp dir, commit it, and run the real `dvc repro` on tiny params."""
import json
import sys

import pytest

from clipdistill import report

from project import STAGES, ran_stages, run

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def project(tiny_project):
    return tiny_project


def test_repro_runs_every_stage_and_writes_metrics(project):
    dst, out = project
    assert ran_stages(out) == STAGES
    metrics = json.loads((dst / "artifacts/eval/metrics.json").read_text())
    for model in ("teacher", "student"):
        assert set(metrics[model]) == {"photo", "sketch", "mean"}
        assert all(0 <= v <= 1 for v in metrics[model].values())
    assert set(metrics["student_zero_shot"]) == {"photo", "sketch", "mean"}
    assert set(metrics["base_to_novel"]) == {"base", "novel", "hm"}
    # The validation split: the train-only styles of world.val_styles, rendered apart from train and test.
    for model in ("teacher", "student"):
        assert set(metrics["val"][model]) == {"neon", "mean"}
    val_files = sorted(p.relative_to(dst / "artifacts/world/val").as_posix()
                       for p in (dst / "artifacts/world/val").rglob("*.png"))
    assert val_files and all(f.startswith("neon/") for f in val_files)
    train_neon = dst / "artifacts/world/train/neon"
    assert all((dst / "artifacts/world/val" / f).read_bytes() != (train_neon / f[len("neon/"):]).read_bytes()
               for f in val_files)
    speed = json.loads((dst / "artifacts/eval/speed.json").read_text())
    assert speed["student"]["gflops_per_image"] > 0 and speed["teacher"]["images_per_s"] > 0
    assert (dst / "artifacts/synth/preview.png").is_file()
    assert len(list((dst / "artifacts/synth/shards").glob("shard_*.tar"))) == 3  # 9 prompts / shard_size 4
    assert not (dst / "artifacts/.synth.work").exists()


def test_second_repro_reruns_nothing(project):
    dst, _ = project
    out = run(["dvc", "repro"], dst).stdout
    assert ran_stages(out) == []


def test_distill_param_reruns_only_distill_and_what_reads_the_student(project):
    dst, _ = project
    before = json.loads((dst / "artifacts/eval/metrics.json").read_text())
    text = (dst / "params.yaml").read_text().replace("  epochs: 1\n  batch_size: 3", "  epochs: 2\n  batch_size: 3")
    (dst / "params.yaml").write_text(text)
    out = run(["dvc", "repro"], dst).stdout
    assert ran_stages(out) == ["distill", "evaluate", "export"]
    # and back: the same params give the same metrics (determinism), restored from the run cache or rerun
    (dst / "params.yaml").write_text(text.replace("  epochs: 2\n  batch_size: 3", "  epochs: 1\n  batch_size: 3"))
    run(["dvc", "repro", "--force", "-s", "distill"], dst)
    run(["dvc", "repro", "--force", "-s", "evaluate"], dst)
    after = json.loads((dst / "artifacts/eval/metrics.json").read_text())
    assert after == before


def test_exp_run_with_set_param(project):
    dst, _ = project
    run(["git", "add", "-A"], dst)
    run(["git", "commit", "-qm", "locked"], dst, check=False)
    out = run(["dvc", "exp", "run", "-S", "distill.temperature=2"], dst)
    assert "distill" in out.stdout + out.stderr
    run(["dvc", "exp", "run", "-n", "contrastive", "-S", "prompts.method=contrastive"], dst)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], dst).stdout)
    rows = {r["name"]: r for r in report.experiments(shown)}
    assert rows["contrastive"]["params"]["prompts"]["method"] == "contrastive"
    assert any(r["params"]["distill"]["temperature"] == 2 for r in rows.values())
    md = report.table(list(rows.values()))
    line = next(ln for ln in md.splitlines() if "| contrastive |" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == 2 + 2 + 4  # method, name, 2 domains, mean, worst, prompt and image diversity
    assert float(cells[-2]) > 0  # contrastive prompts differ; vanilla's are identical (0)


def test_bad_param_fails_with_one_line_and_writes_nothing(project):
    dst, _ = project
    params = dst / "params.yaml"
    good = params.read_text()
    params.write_text(good + "bogus_key: 1\n")
    try:
        proc = run([sys.executable, "stages/distill.py", "--synth", "artifacts/synth", "--world", "artifacts/world",
                    "--teacher", "artifacts/teacher", "--student_clip", "artifacts/student_clip",
                    "--text_features", "artifacts/text_features", "--out", "artifacts/student_bad"], dst, check=False)
    finally:
        params.write_text(good)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bogus_key" in lines[0]
    assert not (dst / "artifacts/student_bad").exists()


def test_interrupted_synthesis_resumes_from_finished_shards(project):
    """A finished shard in the work folder is kept (not recomputed) and the rest come out as in
    an uninterrupted run."""
    import re

    import torch

    from clipdistill.shards import load_shard, save_shard

    dst, _ = project
    cmd = [sys.executable, "stages/synthesize.py", "--prompts", "artifacts/prompts", "--generator",
           "artifacts/generator", "--teacher", "artifacts/teacher", "--text_features", "artifacts/text_features",
           "--out", "artifacts/synth_resume"]
    key = re.search(r"work key (\w+)", run(cmd, dst).stdout).group(1)
    full = dst / "artifacts/synth_resume/shards"
    assert not (dst / "artifacts/.synth_resume.work").exists()
    # Simulate a run killed after its first shard: the work folder holds shard 0 (marked) and a
    # half-written temp file.
    work = dst / "artifacts/.synth_resume.work" / key
    work.mkdir(parents=True)
    shard = load_shard(full / "shard_00000.tar")
    keys, images = shard.pop("keys"), torch.zeros_like(shard.pop("images"))
    save_shard(work / "shard_00000.tar", images, keys, **shard)
    (work / ".shard_00001.tar.tmp").write_bytes(b"partial")
    out = run(cmd, dst).stdout
    assert "1 already done" in out
    resumed = dst / "artifacts/synth_resume/shards"
    assert load_shard(resumed / "shard_00000.tar")["images"].sum() == 0  # kept, not redone
    for name in ("shard_00001.tar", "shard_00002.tar"):
        assert (resumed / name).read_bytes() == (dst / "artifacts/synth/shards" / name).read_bytes()


@pytest.mark.parametrize("sets", [
    ["distill.student=kdpl", "distill.kdpl.class_agnostic=true", "distill.loss=symmetric_kl"],
    ["distill.student=promptkd", "distill.images=world", "distill.loss=promptkd"],
], ids=["kdpl-class-agnostic-synthetic", "promptkd-unlabeled-world"])
def test_prompt_students_run_as_experiments(project, sets):
    dst, _ = project
    run(["git", "add", "-A"], dst)
    run(["git", "commit", "-qm", "locked"], dst, check=False)
    args = [a for s in sets for a in ("-S", s)]
    out = run(["dvc", "exp", "run", "--temp", *args], dst)
    assert ran_stages(out.stdout) == ["distill", "evaluate", "export"]  # export: the prompt student folded
    shown = json.loads(run(["dvc", "exp", "show", "--json"], dst).stdout)
    rows = [r for r in report.experiments(shown) if r["params"]["distill"]["student"] == sets[0].split("=")[1]]
    assert rows, "the experiment's metrics are visible to dvc exp show"
    m = rows[0]["metrics"][report.METRICS]
    assert set(m["base_to_novel"]) == {"base", "novel", "hm"} and 0 <= m["student"]["mean"] <= 1


SYNTH_ARGS = ["--prompts", "artifacts/prompts", "--generator", "artifacts/generator", "--teacher", "artifacts/teacher",
              "--text_features", "artifacts/text_features"]
DISTILL_ARGS = ["--synth", "artifacts/synth", "--world", "artifacts/world", "--teacher", "artifacts/teacher",
                "--student_clip", "artifacts/student_clip", "--text_features", "artifacts/text_features"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_torchrun_synthesis_on_two_processes_writes_the_same_shards(project):
    """Two gloo ranks split the shards (0 and 2 on rank 0, 1 on rank 1) and rank 0 assembles them:
    the output equals the single-process run's, image for image."""
    import pandas as pd

    dst, _ = project
    out = run([*TORCHRUN, "stages/synthesize.py", *SYNTH_ARGS, "--out", "artifacts/synth_2p"], dst)
    assert "rank 0/2: 2 shards" in out.stdout and "rank 1/2: 1 shards" in out.stdout
    one, two = dst / "artifacts/synth", dst / "artifacts/synth_2p"
    assert pd.read_csv(one / "index.csv").equals(pd.read_csv(two / "index.csv"))
    shards = sorted((one / "shards").glob("shard_*.tar"))
    assert len(shards) == 3
    for shard in shards:  # byte for byte: the tar members carry no time or owner of the run
        assert shard.read_bytes() == (two / "shards" / shard.name).read_bytes()
    assert not (dst / "artifacts/.synth_2p.work").exists()


def test_torchrun_distill_with_ddp_takes_the_single_process_steps(project):
    """KDPL (no BatchNorm among its trained parameters): DDP over 2 gloo ranks, each on half of
    every global batch of 4, trains the same context vectors as one process on the whole batch."""
    import torch
    import yaml

    from clipdistill.students import load_student

    dst, _ = project
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["distill"].update(student="kdpl", loss="symmetric_kl", temperature=1.0, batch_size=4, epochs=2,
                             base_to_novel=False)
    (dst / "params_ddp.yaml").write_text(yaml.safe_dump(params))
    args = ["stages/distill.py", "--params", "params_ddp.yaml", *DISTILL_ARGS]
    run([sys.executable, *args, "--out", "artifacts/student_1p"], dst)
    run([*TORCHRUN, *args, "--out", "artifacts/student_2p"], dst)
    one = load_student(dst / "artifacts/student_1p/student.pt")
    two = load_student(dst / "artifacts/student_2p/student.pt")
    torch.testing.assert_close(two.ctx, one.ctx, rtol=1e-4, atol=1e-5)
    h1 = json.loads((dst / "artifacts/student_1p/history.json").read_text())
    h2 = json.loads((dst / "artifacts/student_2p/history.json").read_text())
    assert h1[0]["loss"] != h1[1]["loss"]  # it trained
    assert [round(e["loss"], 4) for e in h1] == [round(e["loss"], 4) for e in h2]
