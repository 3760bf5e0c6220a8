"""FSDP2 on NCCL: the CUDA twin of test_distributed (bf16 compute, fp32 master weights)."""

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.test_distributed import _assert_close, _single, _torchrun

# bf16 autocast on both sides; the ranks reduce gradients in another order than one process.
GPU_ATOL = 2e-3

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(400)]


def test_nccl_ranks_publish_what_one_gpu_process_does(tmp_path):
    if not torch.cuda.is_available():
        pytest.fail("the gpu-marked tests need a CUDA device")
    procs = min(2, torch.cuda.device_count())  # NCCL wants one GPU per rank
    expected = _single(tmp_path, "cuda")
    run = _torchrun(tmp_path, "--device", "cuda", procs=procs)
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_close(load_file(tmp_path / "ranks.safetensors"), expected, GPU_ATOL)
