"""Stage scripts run the package of their own checkout, never another clone's editable install
(DVC would then cache results of code that is not this checkout's deps)."""
import os
import shutil
import subprocess
import sys

import pytest

from project import ROOT, STAGES

SCRIPTS = sorted({f"stages/{'teacher' if s == 'student_clip' else s}.py" for s in STAGES})


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_stage_script_imports_the_package_beside_it(tmp_path, script):
    shutil.copytree(ROOT / "stages", tmp_path / "stages")
    shutil.copytree(ROOT / "clipdistill", tmp_path / "clipdistill")
    with open(tmp_path / "clipdistill" / "__init__.py", "a") as fh:
        fh.write("\nprint('package of the copy')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, script, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "package of the copy" in proc.stdout
