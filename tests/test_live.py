"""Training curves (clipdistill/live.py) and the distill loop's held-out agreement."""
import json

import pytest
import torch
import torch.nn.functional as F

from clipdistill.live import write_curves
from clipdistill.losses import kd_kl
from clipdistill.students import CnnStudent
from clipdistill.training import distill


def read_tsv(path):
    header, *rows = path.read_text().splitlines()
    return header.split("\t"), [tuple(float(v) for v in row.split("\t")) for row in rows]


def test_curves_are_written_in_dvclives_layout_with_window_means(tmp_path):
    loss = [float(i) for i in range(10)]
    write_curves(tmp_path / "live", {"loss": loss, "lr": [0.5] * 10}, max_points=4)  # windows of 3 steps
    header, rows = read_tsv(tmp_path / "live" / "plots" / "metrics" / "loss.tsv")
    assert header == ["step", "loss"]
    assert rows == [(3, 1.0), (6, 4.0), (9, 7.0), (10, 9.0)]  # mean of each window, at the steps done
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert summary["loss"] == 9.0 and summary["lr"] == 0.5 and summary["step"] == 10


def test_same_curves_same_bytes_and_mismatched_lengths_refused(tmp_path):
    curves = {"loss": [1.0, 0.5, 0.25], "lr": [1e-3, 2e-3, 1e-3]}
    write_curves(tmp_path / "a", curves)
    write_curves(tmp_path / "b", curves)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    with pytest.raises(ValueError, match="different lengths"):
        write_curves(tmp_path / "c", {"loss": [1.0], "lr": []})


def run_distill(holdout):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    vectors = F.normalize(torch.randn(3, 8, generator=gen), dim=-1)
    student = CnnStudent(vectors, 10.0, head="projection", width=4, depth=1, backbone="cifar_resnet")
    images = torch.randint(0, 256, (12, 3, 16, 16), generator=gen, dtype=torch.uint8)
    teacher = lambda x: 10.0 * F.normalize(x.mean((2, 3)) @ torch.ones(3, 8), dim=-1) @ vectors.t()  # noqa: E731
    return distill(student, teacher, images, kd_kl, temperature=2.0, epochs=3, batch_size=4, lr=0.01,
                   weight_decay=0.0, augment=True, generator=torch.Generator().manual_seed(1),
                   device=torch.device("cpu"), holdout=holdout)


def test_holdout_agreement_is_logged_per_epoch_without_changing_training():
    holdout = torch.randint(0, 256, (5, 3, 16, 16), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    losses, agreement = run_distill(holdout)
    plain_losses, none = run_distill(None)
    assert none == [] and len(agreement) == 3
    assert all(a in {i / 5 for i in range(6)} for a in agreement)  # a share of the 5 held-out images
    assert losses == plain_losses  # measuring in eval mode draws nothing and updates no statistics
