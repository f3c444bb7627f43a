"""`dvc exp show --json` -> markdown table (clipdistill.report)."""
import json

import pytest

from clipdistill import report


def rev(name, method, student, prompt_div=None, image_div=None, eval_error=False):
    metrics = {report.METRICS: ({"error": {"type": "FileNotFoundError", "msg": "no"}} if eval_error else
                                {"data": {"teacher": {}, "student": student}})}
    if prompt_div is not None:
        metrics[report.PROMPT_METRICS] = {"data": {"prompt_diversity": {"mean": prompt_div}}}
    if image_div is not None:
        metrics[report.SYNTH_METRICS] = {"data": {"image_diversity": {"mean": image_div}}}
    return {"rev": f"{name}-sha", "name": name,
            "data": {"rev": f"{name}-sha", "params": {"params.yaml": {"data": {"prompts": {"method": method}}}},
                     "metrics": metrics}}


SHOW = [
    rev("workspace", "vanilla", {"photo": 0.5, "sketch": 0.3, "mean": 0.4}, 0.0, 0.2),
    {**rev("main", "vanilla", {}, eval_error=True),
     "experiments": [{"name": "mix", "revs": [rev("mix", "mix", {"photo": 0.6, "sketch": 0.4, "mean": 0.5}, 0.3, 0.25)]},
                     {"name": "bad", "revs": [rev("bad", "random", {}, eval_error=True)]}]},
]


def test_experiments_flattens_commits_and_experiments_and_skips_missing_metrics():
    rows = report.experiments(SHOW)
    assert [r["name"] for r in rows] == ["mix"]  # the workspace repeats the last applied experiment
    assert rows[0]["params"]["prompts"]["method"] == "mix"
    alone = report.experiments(SHOW[:1])
    assert [r["name"] for r in alone] == ["workspace"]


def test_table_has_per_domain_mean_worst_and_diversity_columns():
    md = report.table(report.experiments(SHOW)).splitlines()
    assert md[0] == ("| prompts.method | experiment | photo | sketch | mean | worst | prompt div. | image div. |")
    assert md[2] == "| mix | mix | 0.600 | 0.400 | 0.500 | 0.400 | 0.300 | 0.250 |"


def test_missing_diversity_is_a_dash_and_no_experiment_is_an_error(capsys, tmp_path):
    rows = report.experiments([rev("w", "vanilla", {"photo": 1.0, "mean": 1.0})])
    assert report.table(rows).splitlines()[2].endswith("| - | - |")
    path = tmp_path / "show.json"
    path.write_text(json.dumps([rev("w", "vanilla", {}, eval_error=True)]))
    with pytest.raises(SystemExit, match="no experiment has artifacts/eval/metrics.json"):
        report.main([str(path)])


def test_student_table_has_zero_shot_row_and_base_novel_and_speed():
    r = rev("kdpl-world", "vanilla", {"photo": 0.8, "sketch": 0.6, "mean": 0.7})
    m = r["data"]["metrics"]
    m[report.METRICS]["data"].update(student_zero_shot={"photo": 0.5, "sketch": 0.3, "mean": 0.4},
                                     base_to_novel={"base": 0.9, "novel": 0.6, "hm": 0.72})
    m[report.SPEED] = {"data": {"student": {"parameters": 1234, "gflops_per_image": 0.01}, "student_speedup": 2.5}}
    r["data"]["params"]["params.yaml"]["data"]["distill"] = {"student": "kdpl", "images": "world"}
    md = report.student_table(report.experiments([r])).splitlines()
    assert md[2] == "| zero-shot smaller CLIP | - | kdpl-world | 0.400 | 0.300 | - | - | - | - | - | - |"
    assert md[3] == "| kdpl | world | kdpl-world | 0.700 | 0.600 | 0.900 | 0.600 | 0.720 | 1,234 | 0.0100 | 2.50 |"


def test_seed_table_pools_each_method_and_student_over_files(tmp_path, capsys):
    def seed(photo, sketch, cnn_mean):
        cnn = rev("cnn-mix", "mix", {"photo": photo, "sketch": sketch, "mean": cnn_mean}, 0.3, 0.2)
        cnn["data"]["params"]["params.yaml"]["data"]["distill"] = {"student": "cnn"}
        van = rev("cnn-vanilla", "vanilla", {"photo": 0.2, "sketch": 0.4, "mean": 0.3})
        van["data"]["params"]["params.yaml"]["data"]["distill"] = {"student": "cnn"}
        # the baseline commit ran the same params as the vanilla experiment: it counts once
        base = json.loads(json.dumps(van))
        return [{**base, "experiments": [{"name": "v", "revs": [van]}, {"name": "m", "revs": [cnn]}]}]
    paths = []
    for k, values in enumerate([(0.6, 0.4, 0.5), (0.8, 0.9, 0.85), (0.7, 0.5, 0.6)]):
        paths.append(tmp_path / f"seed{k}.json")
        paths[-1].write_text(json.dumps(seed(*values)))
    report.main(["--by", "prompts.method", *map(str, paths)])
    md = capsys.readouterr().out.splitlines()
    assert md[0] == "| prompts.method | student | seeds | photo | sketch | mean | worst | prompt div. | image div. |"
    # vanilla ran without diversity metrics; the worst domain is per seed (0.4, 0.8, 0.5), then pooled
    assert md[2] == "| vanilla | cnn | 3 | 0.200 ± 0.000 | 0.400 ± 0.000 | 0.300 ± 0.000 | 0.200 ± 0.000 | - | - |"
    assert md[3] == ("| mix | cnn | 3 | 0.700 ± 0.100 | 0.600 ± 0.250 | 0.650 ± 0.175 | 0.567 ± 0.200 "
                     "| 0.300 ± 0.000 | 0.200 ± 0.000 |")
    with pytest.raises(SystemExit, match="--students reads one"):
        report.main(["--students", *map(str, paths)])


def test_lead_table_pairs_each_seed_with_its_own_baseline(tmp_path, capsys):
    def seed(vanilla, mix):
        runs = []
        for method, (photo, sketch) in (("vanilla", vanilla), ("mix", mix)):
            r = rev(f"cnn-{method}", method, {"photo": photo, "sketch": sketch, "mean": (photo + sketch) / 2})
            r["data"]["params"]["params.yaml"]["data"]["distill"] = {"student": "cnn"}
            runs.append({"name": method, "revs": [r]})
        base = rev("main", "vanilla", {"photo": 0.9, "sketch": 0.9, "mean": 0.9})  # another student: its own row
        base["data"]["params"]["params.yaml"]["data"]["distill"] = {"student": "kdpl"}
        return [{**base, "experiments": runs}]
    paths = []
    # mix leads on seeds a and c and trails on b
    for name, vanilla, mix in (("a", (0.2, 0.4), (0.6, 0.4)), ("b", (0.8, 0.6), (0.6, 0.6)), ("c", (0.5, 0.3), (0.5, 0.5))):
        paths.append(tmp_path / f"seed-{name}.json")
        paths[-1].write_text(json.dumps(seed(vanilla, mix)))
    report.main(["--against", "vanilla", *map(str, paths)])
    md = capsys.readouterr().out.split("\n\n")[1].splitlines()
    assert md[0] == ("| prompts.method | student | seed-a | seed-b | seed-c | lead over vanilla: mean "
                     "| lead: worst domain |")
    rows = {tuple(line.split(" | ")[:2]): line for line in md[2:]}
    assert rows[("| vanilla", "cnn")] == "| vanilla | cnn | 0.300 (0.200) | 0.700 (0.600) | 0.400 (0.300) | - | - |"
    # leads of the mean: +0.2, -0.1, +0.1; of the worst domain: +0.2, 0.0, +0.2
    assert rows[("| mix", "cnn")] == ("| mix | cnn | 0.500 (0.400) | 0.600 (0.600) | 0.500 (0.500) "
                                      "| +0.067 ± 0.150 (+0.200 / -0.100 / +0.100) | +0.133 ± 0.100 (+0.200 / +0.000 / +0.200) |")
    assert rows[("| vanilla", "kdpl")].endswith("| - | - |")  # no kdpl row to lead over but itself
    with pytest.raises(SystemExit, match="no experiment has prompts.method = contrastive"):
        report.main(["--against", "contrastive", *map(str, paths)])
    with pytest.raises(SystemExit, match="--against pairs seeds"):
        report.main(["--against", "vanilla", str(paths[0])])
