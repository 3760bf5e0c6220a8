"""Every validation outcome, on real rollouts of the tiny model."""

import dataclasses

import msgspec
import pytest
import torch

import toploc
from node.engine import offline_lease
from protocol import messages, poolspec
from protocol.envelope import seal
from protocol.identity import Identity
from toploc import capture_hf
from toploc.models import eos_token_ids, load_model
from toploc.sampling import SamplingParams
from trainer.tasks import make_task
from trainer.validator import Job, LeaseView, Validator

G = 4


@pytest.fixture(scope="module")
def world():
    model, tok = load_model("tiny")
    # max_staleness 3: a submission of version 0 is still trainable while the trainer is at 2
    spec = poolspec.from_dict(
        {"name": "t", "coordinator": {"public_key": "ab" * 32}, "limits": {"max_staleness": 3}}
    )
    task = make_task("copy", 0, {"digits": 3})
    params = SamplingParams(
        temperature=1.0, max_tokens=40, eos_token_ids=tuple(eos_token_ids(model, tok))
    )
    tasks = []
    for t, index in enumerate([3, 9]):
        ids = tok(task.render(task.train[index], tok), add_special_tokens=False)["input_ids"]
        tasks.append({"prompt_index": index, "prompt_ids": ids, "seed": 1000 + t, "group_size": G})
    lease = LeaseView(tasks=tasks, min_version=0, sampling=params)
    validator = Validator(
        spec, task, tok, lambda v: model if v in (0, 1) else None, len(tok), tok.pad_token_id
    )
    return model, tok, lease, validator


def honest(model, tok, lease, version=1):
    results = []
    for t, task in enumerate(lease.tasks):
        rolls = capture_hf.generate(
            model,
            [task["prompt_ids"]] * G,
            lease.sampling,
            [task["seed"]] * G,
            sample_indices=list(range(G)),
            pad_token_id=tok.pad_token_id,
        )
        results.append(
            messages.TaskResult(
                task_index=t,
                completions=[
                    messages.Completion(
                        tokens=r.completion_ids,
                        logprobs=r.logprobs,
                        finish_reason=r.finish_reason,
                        proofs=toploc.build_proofs(r.hidden),
                    )
                    for r in rolls
                ],
            )
        )
    return messages.Submission(lease_id=1, weight_version=version, results=results)


def edit(sub, t=0, j=0, **changes):
    results = list(sub.results)
    comps = list(results[t].completions)
    comps[j] = msgspec.structs.replace(comps[j], **changes)
    results[t] = msgspec.structs.replace(results[t], completions=comps)
    return msgspec.structs.replace(sub, results=results)


@pytest.fixture(scope="module")
def good(world):
    model, tok, lease, _ = world
    return honest(model, tok, lease)


def test_honest_submission_is_accepted_with_rewards(world, good):
    *_, lease, validator = world
    verdict = validator.validate(good, lease, current_version=2)
    assert verdict.outcome == "accept", verdict.reason
    assert len(verdict.groups) == 2
    group = verdict.groups[0]
    assert len(group.rewards) == G and group.weight_version == 1
    assert group.payload.tokens[0] == list(good.results[0].completions[0].tokens)
    assert torch.allclose(
        torch.tensor(group.payload.logprobs[0]),
        torch.tensor(good.results[0].completions[0].logprobs),
        atol=1e-3,
    )


def test_stale_is_soft_and_future_or_older_than_the_lease_is_hard(world, good):
    *_, lease, validator = world
    stale = validator.validate(good, lease, current_version=1 + 3)
    assert (stale.outcome, stale.check) == ("soft", "staleness")
    # a replay of content made before this lease existed, however stale, costs the sender
    later = dataclasses.replace(lease, min_version=2)
    replayed = validator.validate(good, later, current_version=1 + 3)
    assert (replayed.outcome, replayed.check) == ("hard", "staleness")
    assert "oldest this lease allowed" in replayed.reason
    future = validator.validate(msgspec.structs.replace(good, weight_version=9), lease, 2)
    assert (future.outcome, future.check) == ("hard", "staleness")
    gone = validator.validate(msgspec.structs.replace(good, weight_version=2), lease, 2)
    assert (gone.outcome, gone.check) == ("soft", "staleness") and "no longer held" in gone.reason


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda s: msgspec.structs.replace(s, results=s.results[:1]), "results for tasks"),
        (lambda s: edit(s, tokens=[]), "0 tokens"),
        (lambda s: edit(s, tokens=[10**6] * len(s.results[0].completions[0].tokens)), "vocabulary"),
        (lambda s: edit(s, logprobs=[]), "logprobs for"),
        (
            lambda s: edit(s, logprobs=[float("nan")] * len(s.results[0].completions[0].tokens)),
            "finite",
        ),
        (lambda s: edit(s, proofs=[]), "proofs for"),
    ],
)
def test_malformed_is_hard(world, good, mutate, needle):
    *_, lease, validator = world
    verdict = validator.validate(mutate(good), lease, 1)
    assert (verdict.outcome, verdict.check) == ("hard", "structure")
    assert needle in verdict.reason


def test_tampered_token_fails_proof_or_sampling(world, good):
    *_, lease, validator = world
    tokens = list(good.results[0].completions[1].tokens)
    tokens[0] = (tokens[0] + 7) % 50 + 5
    verdict = validator.validate(edit(good, j=1, tokens=tokens), lease, 1)
    assert verdict.outcome == "hard" and verdict.check in ("toploc", "sampling")
    assert verdict.details["sample"] == 1


def test_other_model_fails_toploc(world):
    _, tok, lease, validator = world
    other, _ = load_model("tiny", init_seed=7)
    verdict = validator.validate(honest(other, tok, lease), lease, 1)
    assert (verdict.outcome, verdict.check) == ("hard", "toploc")
    assert verdict.details["exp_mismatches"] > 38


def test_truncated_completion_fails_termination(world, good):
    *_, lease, validator = world
    c = good.results[0].completions[2]
    cut = len(c.tokens) // 2 or 1
    if len(c.tokens) < 2:
        pytest.fail("the tiny model produced a 1-token completion; pick another seed")
    verdict = validator.validate(
        edit(
            good,
            j=2,
            tokens=c.tokens[:cut],
            logprobs=c.logprobs[:cut],
            proofs=toploc.build_proofs(
                capture_hf.prefill(world[0], [lease.tasks[0]["prompt_ids"]], [c.tokens[:cut]])[
                    0
                ].hidden
            ),
            finish_reason="length",
        ),
        lease,
        1,
    )
    assert (verdict.outcome, verdict.check) == ("hard", "termination")


def test_fake_logprobs_fail(world, good):
    *_, lease, validator = world
    c = good.results[1].completions[0]
    verdict = validator.validate(edit(good, t=1, logprobs=[x * 0.5 for x in c.logprobs]), lease, 1)
    assert (verdict.outcome, verdict.check) == ("hard", "logprobs")


def test_wrong_finish_reason_fails(world, good):
    *_, lease, validator = world
    c = good.results[0].completions[0]
    flipped = "length" if c.finish_reason == "stop" else "stop"
    verdict = validator.validate(edit(good, finish_reason=flipped), lease, 1)
    assert (verdict.outcome, verdict.check) == ("hard", "termination")


# ---------------------------------------------------------------- batches of submissions


def _summary(verdict):
    """What must not depend on batching: the outcome, the deciding check, where it failed."""
    where = {k: verdict.details.get(k) for k in ("task", "sample", "chunk")}
    return verdict.outcome, verdict.check, where


@pytest.fixture(scope="module")
def mixed(world, good):
    """Honest and tampered submissions, each kind the serial tests cover."""
    _, tok, lease, _ = world
    c = good.results[0].completions[1]
    tokens = list(c.tokens)
    tokens[0] = (tokens[0] + 7) % 50 + 5
    flipped = "length" if good.results[0].completions[0].finish_reason == "stop" else "stop"
    return [
        good,
        edit(good, j=1, tokens=tokens),
        edit(good, t=1, logprobs=[x * 0.5 for x in good.results[1].completions[0].logprobs]),
        edit(good, finish_reason=flipped),
        msgspec.structs.replace(good, weight_version=0),  # same weights, a second version
        edit(good, proofs=[]),  # malformed: never prefilled
        msgspec.structs.replace(good, weight_version=2),  # not held
        honest(load_model("tiny", init_seed=7)[0], tok, lease),  # other weights
    ]


def _counting(monkeypatch):
    calls = []
    real = capture_hf.prefill

    def prefill(model, prompts, completions, pad_token_id=0):
        calls.append(len(prompts))
        return real(model, prompts, completions, pad_token_id=pad_token_id)

    monkeypatch.setattr(capture_hf, "prefill", prefill)
    return calls


def test_a_batch_gives_the_serial_verdicts_with_one_prefill_per_version(world, mixed, monkeypatch):
    *_, lease, validator = world
    serial = [validator.validate(s, lease, current_version=2) for s in mixed]
    outcomes = ["accept", "hard", "hard", "hard", "accept", "hard", "soft", "hard"]
    assert [v.outcome for v in serial] == outcomes
    calls = _counting(monkeypatch)
    batched = validator.validate_batch([(s, lease) for s in mixed], current_version=2)
    assert [_summary(v) for v, _ in batched] == [_summary(v) for v in serial]
    # version 1: five submissions reach the prefill (honest, three tampered, other weights;
    # the malformed one does not), 2 x G rows each, in one batch; version 0: one submission;
    # version 2 is not held.
    assert calls == [5 * 2 * G, 2 * G]
    assert all(s > 0 for _, s in batched)
    for (b, _), s in zip(batched, serial, strict=True):
        for gb, gs in zip(b.groups, s.groups, strict=True):
            assert gb.rewards == gs.rewards and gb.payload.tokens == gs.payload.tokens
            for x, y in zip(gb.payload.logprobs, gs.payload.logprobs, strict=True):
                assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-5)


@pytest.mark.parametrize("budget_rows, expected", [(0, [1] * 3 * 2 * G), (4 * G, [4 * G, 2 * G])])
def test_a_prefill_budget_splits_the_batch_without_changing_verdicts(
    world, mixed, monkeypatch, budget_rows, expected
):
    # The first three submissions have the same lengths (a token or logprobs changed), so the
    # budget counts rows of the longest completion: none (every rollout is prefilled alone),
    # or two submissions' worth (the first two share a prefill, the third gets its own). A
    # row holds its fp32 logits and its attention masks (length^2 entries of 4 + 4 bytes).
    _, tok, lease, validator = world
    longest = max(len(c.tokens) for r in mixed[0].results for c in r.completions)
    length = max(len(t["prompt_ids"]) for t in lease.tasks) + longest
    row_bytes = longest * len(tok) * 4 + length * length * 8
    small = Validator(
        validator.spec,
        validator.task,
        tok,
        validator.model_for_version,
        len(tok),
        tok.pad_token_id,
        max_prefill_bytes=max(1, budget_rows * row_bytes),
    )
    serial = [validator.validate(s, lease, current_version=2) for s in mixed[:3]]
    calls = _counting(monkeypatch)
    batched = small.validate_batch([(s, lease) for s in mixed[:3]], current_version=2)
    assert calls == expected
    assert [_summary(v) for v, _ in batched] == [_summary(v) for v in serial]


def test_jobs_decode_the_recorded_envelope_and_lease(world, good):
    *_, lease, validator = world
    # The ledger's copy of the tasks is what counts; the signed lease gives min_version.
    signed = offline_lease(
        [t["prompt_ids"] for t in lease.tasks],
        group_size=G,
        max_new_tokens=lease.sampling.max_tokens,
        eos_token_ids=list(lease.sampling.eos_token_ids),
    )
    job = Job(
        7, seal(Identity.generate(), "pool", good), lease.tasks, msgspec.msgpack.encode(signed)
    )
    (checked,) = validator.validate_jobs([job], lease.sampling, current_version=2)
    assert (checked.verdict.outcome, checked.version) == ("accept", 1) and checked.seconds > 0
