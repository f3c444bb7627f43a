"""The experiment scripts never throw away a user's uncommitted params.yaml edits."""
import subprocess

import pytest

from project import ROOT, run

SCRIPTS = sorted(p.name for p in (ROOT / "experiments").glob("*.sh") if p.name != "lib.sh")


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_refuses_to_start_over_uncommitted_params_edits(tmp_path, script):
    (tmp_path / "experiments").mkdir()
    for name in (script, "lib.sh"):
        (tmp_path / "experiments" / name).write_text((ROOT / "experiments" / name).read_text())
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    run(["git", "init", "-q"], tmp_path)
    run(["git", "add", "-A"], tmp_path)
    run(["git", "commit", "-qm", "p"], tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 1  # my edit\n")
    proc = subprocess.run(["bash", f"experiments/{script}"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 1 and "uncommitted edits" in proc.stderr
    assert (tmp_path / "params.yaml").read_text() == "seed: 1  # my edit\n"
