"""The precision and memory format each loop runs in (clipdistill/formats.py)."""
import json

import pytest
import torch

from clipdistill import formats
from clipdistill.formats import CANDIDATES, FP32_CANDIDATES, MARGIN, Format, choose_format, step_probe

CPU = torch.device("cpu")


def never(fmt):
    raise AssertionError("this choice must not probe")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "formats.json"
    monkeypatch.setenv(formats.CACHE_ENV, str(path))
    return path


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(formats, "cpu_info", lambda: ("Test CPU", ["avx512_bf16"]))


def fake_timings(monkeypatch, seconds: dict[str, float], timed: list | None = None) -> list[int]:
    """Make the probe's timing return `seconds` per format name, for the formats it is asked to time
    (their names appended to `timed`, a list per probe); returns a list that counts the probes."""
    probes = []

    def fake_time_all(probe, candidates=CANDIDATES):
        probes.append(1)
        if timed is not None:
            timed.append([fmt.name for fmt in candidates])
        return {fmt.name: seconds[fmt.name] for fmt in candidates}
    monkeypatch.setattr(formats, "_time_all", fake_time_all)
    return probes


def test_explicit_precisions_and_cuda_never_probe(cache):
    assert choose_format("loop", "fp32", CPU, never, {}) == Format(None, False, "precision: fp32")
    assert choose_format("loop", "bf16", CPU, never, {}).amp_dtype is torch.bfloat16
    cuda = choose_format("loop", "auto", torch.device("cuda"), never, {})
    assert cuda.amp_dtype is torch.bfloat16 and cuda.channels_last
    assert not cache.exists()


def test_a_cpu_without_native_bf16_times_the_fp32_formats_only(cache, monkeypatch):
    monkeypatch.setattr(formats, "cpu_info", lambda: ("Old CPU", []))
    timed = []
    # bf16 would win on these timings, but such a CPU only emulates it: it is never timed
    fake_timings(monkeypatch, {"fp32 NCHW": 1.0, "fp32 channels-last": 0.5, "bf16 NCHW": 0.1,
                               "bf16 channels-last": 0.1}, timed)
    fmt = choose_format("loop", "auto", CPU, lambda f: None, {})
    assert fmt.name == "fp32 channels-last" and timed == [["fp32 NCHW", "fp32 channels-last"]]
    assert "Old CPU (no native bf16: fp32 only)" in fmt.why
    assert set(next(iter(json.loads(cache.read_text()).values()))["seconds"]) == {"fp32 NCHW", "fp32 channels-last"}


def test_a_cpu_without_native_bf16_keeps_fp32_nchw_unless_channels_last_is_clearly_faster(cache, monkeypatch):
    monkeypatch.setattr(formats, "cpu_info", lambda: ("Old CPU", []))
    fake_timings(monkeypatch, {"fp32 NCHW": 1.0, "fp32 channels-last": 1.0 / MARGIN + 0.01})
    assert choose_format("loop", "auto", CPU, lambda f: None, {}).name == "fp32 NCHW"


def test_the_fastest_format_wins_and_the_answer_is_cached(cache, native_bf16, monkeypatch):
    probes = fake_timings(monkeypatch, {"fp32 NCHW": 1.0, "fp32 channels-last": 0.9, "bf16 NCHW": 0.5,
                                        "bf16 channels-last": 0.7})
    fmt = choose_format("generator", "auto", CPU, lambda f: None, {"batch": 64})
    assert (fmt.amp_dtype, fmt.channels_last) == (torch.bfloat16, False)
    assert probes == [1] and "Test CPU" in fmt.why and str(cache) in fmt.why
    entry, = json.loads(cache.read_text()).values()
    assert entry["chosen"] == "bf16 NCHW" and entry["loop"] == "generator"
    # the same loop and shapes again: read from the cache, even if timings would now say otherwise
    again = fake_timings(monkeypatch, {"fp32 NCHW": 0.1, "fp32 channels-last": 1, "bf16 NCHW": 1,
                                       "bf16 channels-last": 1})
    assert choose_format("generator", "auto", CPU, never, {"batch": 64}).name == "bf16 NCHW" and not again
    # other shapes are another key: probed again
    assert choose_format("generator", "auto", CPU, lambda f: None, {"batch": 8}).name == "fp32 NCHW"
    assert len(json.loads(cache.read_text())) == 2


def test_a_gain_within_the_margin_keeps_fp32_nchw(cache, native_bf16, monkeypatch):
    fake_timings(monkeypatch, {"fp32 NCHW": 1.0, "fp32 channels-last": 1.0 / MARGIN + 0.01, "bf16 NCHW": 1.2,
                               "bf16 channels-last": 3.0})
    assert choose_format("loop", "auto", CPU, lambda f: None, {}).name == "fp32 NCHW"


def test_an_unreadable_cache_is_probed_again_and_rewritten(cache, native_bf16, monkeypatch):
    cache.write_text("{not json")
    fake_timings(monkeypatch, {"fp32 NCHW": 1.0, "fp32 channels-last": 0.5, "bf16 NCHW": 1.0, "bf16 channels-last": 1})
    assert choose_format("loop", "auto", CPU, lambda f: None, {}).name == "fp32 channels-last"
    assert len(json.loads(cache.read_text())) == 1


def test_step_probe_runs_each_format_on_copies_and_leaves_the_module_alone(gen):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(4, 3, 8, 8, generator=gen)
    seen = []

    def step(net):
        seen.append((net[0].weight.is_contiguous(memory_format=torch.channels_last), torch.is_autocast_enabled('cpu')))
        return net(x)
    probe = step_probe({"net": net}, step, CPU)
    for fmt in CANDIDATES:
        probe(fmt)()
    assert seen == [(c.channels_last, c.amp_dtype is not None) for c in CANDIDATES]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "running stats untouched"
    assert all(p.grad is None for p in net.parameters()) and net[0].weight.is_contiguous()


def test_a_real_probe_picks_one_of_the_candidates(cache, native_bf16, gen):
    conv = torch.nn.Conv2d(3, 8, 3)
    x = torch.rand(2, 3, 16, 16, generator=gen)
    fmt = choose_format("conv", "auto", CPU, step_probe({"conv": conv}, lambda conv: conv(x), CPU), {})
    assert fmt.name in {c.name for c in CANDIDATES}
    assert set(next(iter(json.loads(cache.read_text()).values()))["seconds"]) == {c.name for c in CANDIDATES}


def test_a_real_probe_on_a_cpu_without_native_bf16_times_two_formats(cache, monkeypatch, gen):
    monkeypatch.setattr(formats, "cpu_info", lambda: ("Old CPU", []))
    conv = torch.nn.Conv2d(3, 8, 3)
    x = torch.rand(2, 3, 16, 16, generator=gen)
    fmt = choose_format("conv", "auto", CPU, step_probe({"conv": conv}, lambda conv: conv(x), CPU), {})
    assert fmt.amp_dtype is None and fmt.name in {c.name for c in FP32_CANDIDATES}
    assert set(next(iter(json.loads(cache.read_text()).values()))["seconds"]) == {c.name for c in FP32_CANDIDATES}


class FakeRanks:
    """A Dist stand-in that records when its barrier is called relative to the probe."""

    def __init__(self, rank: int, events: list):
        self.processes, self.rank, self.main, self.events = 2, rank, rank == 0, events

    def barrier(self):
        self.events.append(f"barrier {self.rank}")


def test_under_torchrun_rank_0_probes_and_the_others_read_its_answer_after_the_barrier(cache, native_bf16,
                                                                                       monkeypatch):
    events = []
    seconds = {"fp32 NCHW": 1.0, "fp32 channels-last": 0.5, "bf16 NCHW": 1.0, "bf16 channels-last": 1.0}
    monkeypatch.setattr(formats, "_time_all", lambda probe, candidates: events.append("probe") or dict(seconds))
    first = choose_format("loop", "auto", CPU, lambda f: None, {}, FakeRanks(0, events))
    other = choose_format("loop", "auto", CPU, never, {}, FakeRanks(1, events))
    assert events == ["probe", "barrier 0", "barrier 1"]  # rank 1 passes its barrier only once rank 0 has cached
    assert first.name == other.name == "fp32 channels-last"


def test_a_near_tie_resolves_to_the_earlier_format_not_the_one_timed_faster(cache, native_bf16, monkeypatch):
    """fp32 channels-last is a clear gain over NCHW; bf16 channels-last is 3 % faster still, within
    timing noise, so the fp32 one stays: two probes of the same loop then agree."""
    fake_timings(monkeypatch, {"fp32 NCHW": 1.0, "fp32 channels-last": 0.70, "bf16 NCHW": 0.9,
                               "bf16 channels-last": 0.68})
    assert choose_format("loop", "auto", CPU, lambda f: None, {}).name == "fp32 channels-last"
