"""Device, precision and process-group plumbing that every stage shares."""
import pytest
import torch

from clipdistill.runtime import (Dist, PipelineError, autocast, channels_last, init_distributed, resolve_precision,
                                 setup_torch)

CPU = torch.device("cpu")


def test_precision_auto_is_fp32_on_cpu_and_bf16_on_cuda():
    assert resolve_precision("auto", CPU) is None
    assert resolve_precision("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_precision("fp32", torch.device("cuda")) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16


def test_autocast_is_a_no_op_for_fp32_and_casts_matmuls_for_bf16(gen):
    a, b = torch.randn(4, 8, generator=gen), torch.randn(8, 3, generator=gen)
    with autocast(CPU, None):
        assert (a @ b).dtype == torch.float32
    with autocast(CPU, torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16


def test_channels_last_only_on_cuda():
    conv = torch.nn.Conv2d(3, 8, 3)
    channels_last(conv, CPU)
    assert conv.weight.is_contiguous()
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PipelineError, match="no CUDA GPU"):
        setup_torch("cuda", 0)
    assert setup_torch("auto", 0) == CPU


def test_plain_launch_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist, device = init_distributed(CPU)
    assert dist == Dist(0, 1) and dist.main and device == CPU
    dist.barrier()  # no process group: nothing to wait for
    dist.close()
