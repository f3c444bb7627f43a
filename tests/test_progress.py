"""Long loops report progress in a log (no TTY) as well as on a terminal."""
import io
import itertools

import torch

from clipdistill import progress as progress_module
from clipdistill.progress import LogLines, progress
from clipdistill.resumable import Checkpoints, run_steps


def _clock(seconds_per_call: float):
    """A fake clock that moves `seconds_per_call` at each reading."""
    ticks = itertools.count()
    return lambda: next(ticks) * seconds_per_call


def _lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_a_line_per_tenth_of_a_slow_loop():
    out = io.StringIO()
    bar = LogLines(95, desc="loop", unit="step", file=out, clock=_clock(30.0))
    for _ in range(95):
        bar.update(1)
    lines = _lines(out)
    assert len(lines) == 10
    assert lines[0].startswith("loop: 10/95 step (10 %), 30 s,") and lines[-1].startswith("loop: 95/95 step (100 %)")


def test_a_fast_loop_prints_nothing_and_lines_are_spaced_in_time():
    out = io.StringIO()
    bar = LogLines(100, desc="fast", file=out, clock=_clock(0.0))
    bar.update(100)
    assert _lines(out) == []
    # 4 s a tenth: a line every third tenth (12 s), then the last one at the end
    bar = LogLines(10, desc="mid", file=out, clock=_clock(4.0))
    for _ in range(10):
        bar.update(1)
    assert [line.split()[1] for line in _lines(out)] == ["3/10", "6/10", "9/10", "10/10"]


def test_a_resumed_loop_reports_only_what_is_left_and_its_postfix():
    out = io.StringIO()
    bar = LogLines(100, desc="loop", initial=55, file=out, clock=_clock(10.0))
    bar.set_postfix(loss="0.1234")
    for _ in range(45):
        bar.update(1)
    lines = _lines(out)
    assert [line.split()[1] for line in lines] == ["60/100", "70/100", "80/100", "90/100", "100/100"]
    assert all(line.endswith("left, loss 0.1234") for line in lines)


def test_big_updates_and_an_empty_loop():
    out = io.StringIO()
    bar = LogLines(7, desc="shards", file=out, clock=_clock(60.0))
    bar.update(4)
    bar.update(3)
    assert [line.split()[1] for line in _lines(out)] == ["4/7", "7/7"]
    LogLines(0, desc="none", file=out, clock=_clock(60.0)).close()  # no division by zero, no line
    assert len(_lines(out)) == 2


def test_off_when_disabled_and_lines_on_stdout_when_stderr_is_no_tty(capsys, monkeypatch):
    silent = progress(10, desc="rank 1", enabled=False)
    silent.update(10)
    silent.close()
    assert capsys.readouterr() == ("", "")
    bar = progress(10, desc="rank 0")  # pytest's capture is no TTY
    assert isinstance(bar, LogLines)
    bar.clock, bar.last = _clock(20.0), -20.0
    bar.update(10)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("rank 0: 10/10 it (100 %)")


def test_run_steps_logs_its_progress(capsys, tmp_path, monkeypatch):
    real = progress_module.LogLines
    monkeypatch.setattr(progress_module, "LogLines", lambda *a, **kw: real(*a, **kw, clock=_clock(15.0)))
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)

    def step(i):
        opt.zero_grad()
        loss = (param - 1).pow(2).sum()
        loss.backward()
        opt.step()
        return float(loss.detach())

    run_steps(step, 20, state={"p": opt}, generators=[], checkpoints=Checkpoints(tmp_path / "ck", 0), desc="fit")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fit: ")]
    assert len(lines) == 10 and lines[-1].startswith("fit: 20/20 step (100 %)") and "loss " in lines[-1]
