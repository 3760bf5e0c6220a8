"""FSDP2 on NCCL: the CUDA twin of test_distributed (bf16 compute, fp32 master weights), with
every weight trained and with LoRA adapters on a frozen base."""

import pytest
import torch

from tests.trainer.test_distributed import _ranks_match, _single, _torchrun

# bf16 autocast on both sides; the ranks reduce gradients in another order than one process.
GPU_ATOL = 2e-3

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(400)]


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_nccl_ranks_publish_what_one_gpu_process_does(tmp_path, lora_rank):
    if not torch.cuda.is_available():
        pytest.fail("the gpu-marked tests need a CUDA device")
    procs = min(2, torch.cuda.device_count())  # NCCL wants one GPU per rank
    single = _single(tmp_path, "cuda", lora_rank)
    run = _torchrun(tmp_path, "--device", "cuda", "--lora-rank", str(lora_rank), procs=procs)
    assert run.returncode == 0, run.stderr[-3000:]
    _ranks_match(tmp_path, single, lora_rank, GPU_ATOL)
