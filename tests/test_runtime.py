"""Device, precision and process-group plumbing that every stage shares."""
import os
import subprocess
import sys

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


def test_stages_run_deterministic_algorithms_without_the_nan_fill_of_new_tensors(monkeypatch):
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
    setup_torch("cpu", 0)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.utils.deterministic.fill_uninitialized_memory


def test_plain_launch_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist, device = init_distributed(CPU)
    assert dist == Dist(0, 1) and dist.main and device == CPU
    dist.barrier()  # no process group: nothing to wait for
    dist.close()


# A decoder step of the embedded VQGAN at batch 64, run in a fresh process with or without the
# allocator policy; prints the page faults one step takes once warm.
FAULTS_PER_STEP = """
import resource, sys, torch
from clipdistill.runtime import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
from clipdistill.vqgan import VQGAN, VQGANConfig
torch.manual_seed(0)
model = VQGAN(VQGANConfig(ch_mult=(1, 1, 2), num_res_blocks=0)).requires_grad_(False)
z = torch.randn(64, 32, 8, 8, requires_grad=True)
def step():
    model.decode(z).square().mean().backward()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step(); step()
start = faults()
for _ in range(4):
    step()
print(applied, (faults() - start) / 4)
"""


def test_retained_memory_stops_each_step_from_page_faulting_its_activations_again():
    def run(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True,
                             check=True, env=dict(os.environ, OMP_NUM_THREADS="1")).stdout.split()
        return out[0] == "True", float(out[1])

    applied, retained = run("retain")
    _, default = run("default")
    assert applied  # Linux with glibc, as CI and our machines
    # glibc's default maps a step's activations (~16k pages at one thread) afresh every step; retained, they are reused.
    assert default > 4000
    assert retained < default / 10


_STAGE = """
import sys
from clipdistill.runtime import PipelineError, run_stage
from clipdistill.params import ParamsError
from clipdistill.vqgan import CheckpointError
kind = sys.argv[1]
def main():
    if kind == "pipeline":
        raise PipelineError("image folder /x not found\\nsecond line")
    if kind == "params":
        raise ParamsError("params key 'distill.lr' must be > 0")
    if kind == "checkpoint":
        raise CheckpointError("taming checkpoint c.ckpt is unreadable")
    raise ValueError("an internal bug")
run_stage(main)
"""


def _stage(kind, **env):
    return subprocess.run([sys.executable, "-c", _STAGE, kind], capture_output=True, text=True,
                          env={**os.environ, **env})


@pytest.mark.parametrize("kind,text", [("pipeline", "image folder /x not found"),
                                       ("params", "distill.lr"), ("checkpoint", "c.ckpt")])
def test_user_errors_print_one_line_and_exit_1(kind, text):
    proc = _stage(kind)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and text in proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_any_other_exception_keeps_its_traceback():
    proc = _stage("other")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ValueError: an internal bug" in proc.stderr


def test_debug_env_shows_the_traceback_of_a_user_error():
    proc = _stage("pipeline", CLIPDISTILL_DEBUG="1")
    assert "Traceback" in proc.stderr and "PipelineError: image folder /x not found" in proc.stderr


def test_stages_refuse_to_start_with_torch_safe_loading_switched_off(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(PipelineError, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        setup_torch("cpu", 0)


# Blocks freed in another thread's arena stay mapped under the retain policy until released.
RELEASE = """
import threading, psutil, torch
from clipdistill.runtime import release_free_memory, retain_freed_memory
retain_freed_memory()
def churn():
    blocks = [torch.ones(2**18) for _ in range(400)]  # 400 x 1 MiB, heap-served, in this thread's arena
    del blocks
thread = threading.Thread(target=churn)
thread.start(); thread.join()
rss = lambda: psutil.Process().memory_info().rss / 2**20
before = rss()
applied = release_free_memory()
print(applied, before - rss())
"""


def test_release_free_memory_gives_retained_blocks_of_other_threads_back():
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True"
    assert float(out[1]) > 200  # MiB handed back of the 400 the thread freed
