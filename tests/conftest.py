import os
import tempfile

import pytest
import torch

from clipdistill.formats import CACHE_ENV
from project import ROOT, committed_copy, run

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# The stages' per-machine format probes (clipdistill/formats.py) cache in a file of this session, shared by
# every stage the tests run, rather than in the user's ~/.cache.
os.environ.setdefault(CACHE_ENV, os.path.join(tempfile.mkdtemp(prefix="clipdistill-formats-"), "formats.json"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    """The repo copied, committed and run once with `dvc repro` on tests/tiny_params.yaml, shared by
    the end-to-end and bad-input tests: (project folder, stdout of that first repro)."""
    dst = committed_copy(tmp_path_factory.mktemp("proj"), ROOT / "tests" / "tiny_params.yaml")
    return dst, run(["dvc", "repro"], dst).stdout
