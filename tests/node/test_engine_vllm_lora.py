"""The vllm engine on LoRA adapter versions: merged by the validators' loader and loaded like
any full version, first built from and then swapped in place; what it generates passes
validation against the validators' merge. Runs on vLLM's CPU build in the vLLM suite, and on
CUDA in the GPU check."""

import pytest
import torch
from lora_helpers import publish

from toploc.versions import VersionLoader

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_vllm_rollouts_from_adapter_versions_pass_validation(tmp_path, tiny, validate, device):
    from node.engine_vllm import VLLMEngine

    publish(tmp_path, [1, 2])
    validators = VersionLoader(torch.float32, reuse_base=False)
    engine = VLLMEngine(device=device, dtype="float32", max_batch=16)
    engine.load(tmp_path / "v1", 1)  # a node that joins at an adapter version builds from it
    engine.load(tmp_path / "v2", 2)  # and swaps the next one in place
    model = validators.load(tmp_path / "v2")
    verdict = validate(model, tiny.tok, tiny.task, tiny.lease, engine.generate(tiny.lease), 2)
    assert verdict.outcome == "accept", verdict.reason
