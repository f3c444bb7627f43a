"""Resumable training: work keys, atomic checkpoints with fallback, and a resumed loop that ends
bit-identical to an uninterrupted one."""
import random

import numpy as np
import pytest
import torch

from clipdistill import resumable
from clipdistill.resumable import Checkpoints, EpochOrder, TensorState, TrainableState, run_steps, work_key


def test_work_key_changes_with_config_file_content_folder_and_code(tmp_path, monkeypatch):
    f = tmp_path / "f"
    f.write_text("a")
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "0.png").write_bytes(b"x")
    k = work_key({"steps": 1}, [f, folder])
    assert k == work_key({"steps": 1}, [f, folder])
    assert k != work_key({"steps": 2}, [f, folder])
    f.write_text("b")
    k2 = work_key({"steps": 1}, [f, folder])
    assert k2 != k
    (folder / "1.png").write_bytes(b"y")
    assert work_key({"steps": 1}, [f, folder]) != k2
    k3 = work_key({"steps": 1}, [f, folder])
    code = tmp_path / "pkg"
    code.mkdir()
    (code / "m.py").write_text("A = 1\n")
    monkeypatch.setattr(resumable, "PACKAGE_DIR", code)
    k4 = work_key({"steps": 1}, [f, folder])
    (code / "m.py").write_text("A = 2\n")
    assert work_key({"steps": 1}, [f, folder]) != k4
    assert k4 != k3


def test_checkpoints_keep_the_newest_and_fall_back_past_a_truncated_file(tmp_path, capsys):
    ck = Checkpoints(tmp_path / "work", every=2, keep=2)
    assert ck.latest() is None
    for step in (2, 4, 6):
        ck.save(step, {"step": step, "w": torch.full((3,), float(step))})
    names = sorted(p.name for p in (tmp_path / "work").iterdir())
    assert names == ["step_000000004.pt", "step_000000006.pt"]
    assert ck.latest()["step"] == 6
    newest = tmp_path / "work" / "step_000000006.pt"
    newest.write_bytes(newest.read_bytes()[:50])  # killed while the disk wrote it
    assert ck.latest()["step"] == 4
    assert "unreadable" in capsys.readouterr().out
    assert [ck.due(s, 7) for s in range(1, 8)] == [False, True, False, True, False, True, True]


def test_checkpoints_write_nothing_off_rank_zero_and_clear_removes_the_work_folder(tmp_path):
    from clipdistill.runtime import Dist

    work = tmp_path / ".out.work" / "abc"
    Checkpoints(work, 1, Dist(rank=1, processes=2)).save(1, {"step": 1})
    assert not work.exists()
    ck = Checkpoints(work, 1)
    ck.sub("student").save(1, {"step": 1})
    assert (work / "student" / "step_000000001.pt").is_file()
    ck.clear()
    assert not (tmp_path / ".out.work").exists()


def _train(folder, total=12, crash_at=None):
    """A tiny model trained with an epoch sampler, augmentation noise from the loop's generator,
    dropout (global RNG), a python and a numpy draw per step, and a usage counter."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    gen = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    data = torch.randn(10, 4, generator=torch.Generator().manual_seed(2))
    batches = EpochOrder(10, 4, gen)
    count = TensorState(torch.zeros(1))

    def step(i):
        if i == crash_at:
            raise KeyboardInterrupt  # stands in for a kill
        x = data[batches.batch(i)] + 0.1 * torch.randn(4, 4, generator=gen)
        loss = model(x).pow(2).mean() * (1 + random.random() * 1e-3) * (1 + float(np.random.rand()) * 1e-3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        count.tensor += 1
        return loss.item()

    losses = run_steps(step, total, state={"model": model, "optimizer": opt, "scheduler": sched,
                                           "batches": batches, "count": count},
                       generators=[gen], checkpoints=Checkpoints(folder, every=5), desc="t", progress=False)
    return losses, model.state_dict(), count.tensor.item()


def test_a_resumed_loop_ends_bit_identical_to_an_uninterrupted_one(tmp_path, capsys):
    ref_losses, ref_state, ref_count = _train(None)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "w", crash_at=7)  # mid-epoch (3 steps per epoch), after the step-5 save
    losses, state, count = _train(tmp_path / "w")
    assert "resuming from step 5 of 12" in capsys.readouterr().out
    assert losses == ref_losses and count == ref_count == 12
    for k in ref_state:
        assert torch.equal(state[k], ref_state[k]), k


def test_without_a_checkpoint_a_rerun_starts_at_step_zero(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "w", crash_at=3)  # before the first save
    _, _, count = _train(tmp_path / "w")
    assert count == 12 and "resuming" not in capsys.readouterr().out


def test_trainable_state_leaves_frozen_parameters_out_and_loads_back():
    def build(seed):
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
        m[0].requires_grad_(False)  # a frozen tower
        return m

    a = build(0)
    a[1].running_mean.fill_(0.5)
    state = TrainableState(a).state_dict()
    assert not any(k.startswith("0.") for k in state) and "1.running_mean" in state and "2.weight" in state
    b = build(1)
    frozen = b[0].weight.clone()
    TrainableState(b).load_state_dict(state)
    assert torch.equal(b[2].weight, a[2].weight) and torch.equal(b[1].running_mean, a[1].running_mean)
    assert torch.equal(b[0].weight, frozen)  # untouched: the stage rebuilds it
    with pytest.raises(RuntimeError, match="does not fit"):
        TrainableState(b).load_state_dict({**state, "3.weight": torch.zeros(1)})
