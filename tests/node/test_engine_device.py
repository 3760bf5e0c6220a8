"""A node on a GPU: the hf engine generates on CUDA, and a validator on the CPU (where a
coordinator without a GPU prefills) accepts its rollouts."""

import copy

import pytest
import torch

from node.engine import HFEngine
from toploc.models import model_dir

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rollouts_generated_on_cuda_pass_validation_on_the_cpu(tiny, validate, dtype):
    if not torch.cuda.is_available():
        pytest.fail("the gpu-marked tests need a CUDA device")
    engine = HFEngine("cuda", dtype=dtype, max_batch=16)
    engine.load(model_dir("tiny"), 0)
    results = engine.generate(tiny.lease)
    assert [len(r.completions) for r in results] == [4, 4, 4]
    model = copy.deepcopy(tiny.model).to(getattr(torch, dtype))
    verdict = validate(model, tiny.tok, tiny.task, tiny.lease, results, 0)
    assert verdict.outcome == "accept", verdict.reason
