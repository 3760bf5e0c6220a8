"""Generation-time capture (padded batch, KV cache) agrees with the verifier's prefill."""

import pytest
import torch

from toploc import (
    SamplingParams,
    all_ok,
    build_proofs,
    verify_logprobs,
    verify_proofs,
    verify_sampling,
)
from toploc.capture_hf import generate, prefill
from toploc.models import eos_token_ids, load_model

TEXTS = [
    "1+1=",
    "hello there, 123",
    "abc",
    "a much longer prompt: 98765 + 43210 = ?",
    "x",
    "Sort: 3 1 2",
    "zz top",
    "The quick brown fox jumps",
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_generation_capture_matches_prefill(dtype):
    model, tok = load_model("tiny", dtype=dtype, init_seed=1)
    params = SamplingParams(
        temperature=1.0,
        top_k=40,
        top_p=0.95,
        max_tokens=40,
        eos_token_ids=tuple(eos_token_ids(model, tok)),
    )
    checked = 0
    for batch in (1, 4, 16):
        prompts = [
            tok(TEXTS[i % len(TEXTS)] * (1 + i // len(TEXTS))).input_ids for i in range(batch)
        ]
        seeds = [1000 + batch + i for i in range(batch)]
        rollouts = generate(
            model,
            prompts,
            params,
            seeds,
            sample_indices=list(range(batch)),
            pad_token_id=tok.pad_token_id,
        )
        assert len({len(p) for p in prompts}) > 1 or batch == 1
        for r in rollouts:
            (pf,) = prefill(model, [r.prompt_ids], [r.completion_ids])
            assert r.hidden.shape == pf.hidden.shape == (len(r.completion_ids), 128)
            verdicts = verify_proofs(pf.hidden, build_proofs(r.hidden))
            assert all_ok(verdicts), [v.reason for v in verdicts]
            s = verify_sampling(pf.logits, r.completion_ids, r.seed, params, r.sample_index)
            assert s.ok, s.reason
            lp = verify_logprobs(pf.logits, r.completion_ids, r.logprobs, params)
            assert lp.ok, lp.reason
            checked += 1
    assert checked == 21


def test_batched_prefill_matches_single_and_rows_are_the_right_ones():
    model, tok = load_model("tiny", init_seed=2)
    params = SamplingParams(temperature=1.0, max_tokens=12)
    prompts = [tok(t).input_ids for t in TEXTS[:4]]
    rollouts = generate(model, prompts, params, seeds=[0] * 4, pad_token_id=tok.pad_token_id)
    batched = prefill(model, [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts])
    for r, b in zip(rollouts, batched, strict=True):
        (single,) = prefill(model, [r.prompt_ids], [r.completion_ids])
        assert torch.allclose(b.hidden, single.hidden, atol=1e-5)
        assert verify_sampling(b.logits, r.completion_ids, r.seed, params).ok
        # A row off by one would verify against the wrong states.
        shifted = torch.cat([single.hidden[1:], single.hidden[-1:]])
        assert not all_ok(verify_proofs(shifted, build_proofs(r.hidden)))


def test_eos_stops_a_row_and_finish_reason():
    model, tok = load_model("tiny", init_seed=3)
    eos = tuple(eos_token_ids(model, tok))
    params = SamplingParams(temperature=1.5, max_tokens=200, eos_token_ids=eos)
    prompts = [tok(t).input_ids for t in TEXTS]
    rollouts = generate(model, prompts, params, seeds=list(range(8)), pad_token_id=tok.pad_token_id)
    stopped = [r for r in rollouts if r.finish_reason == "stop"]
    assert stopped
    for r in rollouts:
        assert len(r.completion_ids) == len(r.logprobs) == r.hidden.shape[0]
        assert all(t not in eos for t in r.completion_ids[:-1])
        if r.finish_reason == "length":
            assert len(r.completion_ids) == 200


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_repeated_prompt_is_prefilled_once_and_samples_as_if_it_were_not(dtype):
    """Groups of G samples of one prompt, mixed with prompts of other lengths: the shared
    prefill gives each row what generating it alone gives, and it passes verification."""
    model, tok = load_model("tiny", dtype=dtype, init_seed=4)
    params = SamplingParams(
        temperature=1.0, max_tokens=24, eos_token_ids=tuple(eos_token_ids(model, tok))
    )
    a, b, c = (tok(TEXTS[i]).input_ids for i in (3, 0, 5))
    prompts = [a, a, a, b, a, c, b, c]
    seeds = [7, 7, 7, 9, 7, 11, 9, 11]
    indices = [0, 1, 2, 0, 3, 0, 1, 1]
    calls = []
    hook = model.register_forward_pre_hook(
        lambda _m, _args, kw: calls.append(kw["input_ids"]), with_kwargs=True
    )
    try:
        grouped = generate(model, prompts, params, seeds, indices, tok.pad_token_id)
    finally:
        hook.remove()
    assert calls[0].shape[0] == 3  # three distinct prompts prefilled, not eight
    for r, p, s, j in zip(grouped, prompts, seeds, indices, strict=True):
        (alone,) = generate(model, [p], params, [s], [j], tok.pad_token_id)
        assert r.prompt_ids == p and r.completion_ids == alone.completion_ids
        tol = 1e-4 if dtype == "float32" else 5e-2
        assert torch.allclose(torch.tensor(r.logprobs), torch.tensor(alone.logprobs), atol=tol)
        (pf,) = prefill(model, [r.prompt_ids], [r.completion_ids])
        assert all_ok(verify_proofs(pf.hidden, build_proofs(r.hidden)))
        assert verify_sampling(pf.logits, r.completion_ids, s, params, j).ok
    assert len({tuple(r.completion_ids) for r in grouped[:3]}) > 1  # samples differ


def test_a_shared_prompt_prefill_matches_whole_sequences():
    model, tok = load_model("tiny", init_seed=2)
    params = SamplingParams(temperature=1.0, max_tokens=12)
    # Two groups of 3 samples on prompts of different lengths, and a one-token completion.
    prompts = [tok(TEXTS[0]).input_ids] * 3 + [tok(TEXTS[1]).input_ids] * 3
    rollouts = generate(
        model, prompts, params, seeds=[5] * 6, sample_indices=[0, 1, 2] * 2, pad_token_id=0
    )
    pairs = [(r.prompt_ids, r.completion_ids) for r in rollouts] + [(prompts[0], [7])]
    args = ([p for p, _ in pairs], [c for _, c in pairs])
    shared = prefill(model, *args, pad_token_id=tok.pad_token_id)
    whole = prefill(model, *args, pad_token_id=tok.pad_token_id, share_prefill=False)
    for (_, c), s, w in zip(pairs, shared, whole, strict=True):
        assert s.hidden.shape == w.hidden.shape == (len(c), w.hidden.shape[1])
        assert torch.allclose(s.hidden, w.hidden, atol=1e-5)
        assert torch.allclose(s.logits, w.logits, atol=1e-4)
    for r, s in zip(rollouts, shared[:6], strict=True):  # what the node proved, re-checked
        assert all_ok(verify_proofs(s.hidden, build_proofs(r.hidden)))
        assert verify_sampling(s.logits, r.completion_ids, r.seed, params, r.sample_index).ok


def test_a_forward_on_another_thread_is_not_captured_and_prefill_stays_whole():
    """The dashboard's "try the policy" runs the model on its own thread while the validator
    prefills on another; the LM head hook is the model's, so it must record only its own
    thread's passes. Here another thread's forward (batch 1) runs inside the capture: before
    the fix it became the capture's first entry and `prefill` of two distinct prompts failed
    with an IndexError (seen in CI, where it ended the coordinator)."""
    import threading

    from toploc.capture_hf import lm_head_inputs

    model, tok = load_model("tiny", dtype="float32", init_seed=1)
    other = tok(TEXTS[0]).input_ids
    prompts = [tok(TEXTS[1]).input_ids, tok(TEXTS[2]).input_ids]
    completions = [[5, 6, 7], [8, 9]]
    expected = prefill(model, prompts, completions)

    with lm_head_inputs(model) as seen:
        t = threading.Thread(target=lambda: model(input_ids=torch.tensor([other])))
        t.start()
        t.join()
        assert seen == []  # the other thread's pass was not recorded
        model(input_ids=torch.tensor([prompts[0]]))
        assert len(seen) == 1 and seen[0].shape[0] == 1

    # and prefill itself, with a pass of another thread landing between its forwards
    real_forward = model.forward
    cut_in = []

    def forward_with_a_neighbour(*args, **kwargs):
        if not cut_in:
            cut_in.append(1)
            t = threading.Thread(target=lambda: real_forward(input_ids=torch.tensor([other])))
            t.start()
            t.join()
        return real_forward(*args, **kwargs)

    model.forward = forward_with_a_neighbour
    try:
        got = prefill(model, prompts, completions)
    finally:
        model.forward = real_forward
    assert cut_in
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g.hidden, e.hidden) and torch.equal(g.logits, e.logits)
