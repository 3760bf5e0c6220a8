"""Multi-turn rollouts on the tiny model: the node's turn loop, the validator's replay of the
environment, and each multi-turn cheat caught."""

import sys
from pathlib import Path

import msgspec
import pytest

from node.engine import HFEngine, offline_lease
from node.multiturn import generate_turns
from protocol import messages
from protocol.environments import EnvError, TurnLimits, environment_for
from toploc.models import eos_token_ids, load_model
from trainer.tasks import make_task

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from byzantine import FakeObservation, SkipTurn, edit_replies

G = 4
MAX_NEW = 8


@pytest.fixture(scope="module")
def world():
    model, tok = load_model("tiny")
    task = make_task("guess", 0, {"max_turns": 4})
    eos = eos_token_ids(model, tok)
    ids = tok(task.render(task.train[0], tok), add_special_tokens=False)["input_ids"]
    lease = offline_lease(
        [ids, ids], group_size=G, max_new_tokens=MAX_NEW, eos_token_ids=eos, first_seed=100
    )
    engine = HFEngine()
    engine.model, engine.pad_token_id, engine.version = model, tok.pad_token_id, 0
    return engine, tok, task, lease


@pytest.fixture
def check(world, validate):
    """The coordinator's verdict on a submission for the world's lease (`task`: another)."""
    engine, tok, task, lease = world

    def verdict(sub, other_task=None):
        return validate(engine.model, tok, other_task or task, lease, sub.results, 0)

    return verdict


def submit(results) -> messages.Submission:
    return messages.Submission(lease_id=1, weight_version=0, results=results)


@pytest.fixture(scope="module")
def honest(world):
    engine, tok, task, lease = world
    return submit(generate_turns(engine, task.environment, tok, lease))


def edit(sub, t=0, j=0, **changes):
    """`sub` with completion j of task t changed."""
    results = [
        msgspec.structs.replace(
            r,
            completions=[
                msgspec.structs.replace(c, **changes) if (i, k) == (t, j) else c
                for k, c in enumerate(r.completions)
            ],
        )
        for i, r in enumerate(sub.results)
    ]
    return msgspec.structs.replace(sub, results=results)


def longest(sub) -> tuple[int, int]:
    """(task, sample) of the rollout with the most segments."""
    return max(
        ((t, j) for t, r in enumerate(sub.results) for j in range(len(r.completions))),
        key=lambda tj: len(sub.results[tj[0]].completions[tj[1]].segments),
    )


def test_honest_transcripts_pass_every_check_and_train_only_on_model_tokens(check, honest):
    t, j = longest(honest)
    assert len(honest.results[t].completions[j].segments) >= 3, "no multi-turn rollout drawn"
    verdict = check(honest)
    assert verdict.outcome == "accept", verdict
    for group, result in zip(verdict.groups, honest.results, strict=True):
        p = group.payload
        assert p.segments == [list(c.segments) for c in result.completions]
        assert [len(x) for x in p.logprobs] == [len(x) for x in p.tokens]


def test_rewards_replay_the_game(world, check, honest):
    _, tok, task, lease = world
    env = task.environment
    verdict = check(honest)
    reward = task.rewards[0].func
    for group, result in zip(verdict.groups, honest.results, strict=True):
        seed = lease.tasks[group.task_index].seed
        turns = [
            [tok.decode(c.tokens[:n], skip_special_tokens=True)]
            for c in result.completions
            for n in [c.segments[0]]
        ]
        firsts = reward([""] * G, [""] * G, turns=turns, seed=[seed] * G, low=[0] * G, high=[9] * G)
        # a game won on the first turn is worth the same whatever came after
        assert [r == 1.0 for r in group.rewards] == [f == 1.0 for f in firsts]
    # a transcript that names the secret on its first turn earns the top reward
    secret = env.secret(7)
    assert reward([""], [""], turns=[[str(secret)]], seed=[7], low=[0], high=[9]) == [1.0]
    assert reward([""], [""], turns=[["x", str(secret)]], seed=[7], low=[0], high=[9]) == [0.8]
    assert reward([""], [""], turns=[["x"]], seed=[7], low=[0], high=[9]) == [0.0]


@pytest.mark.parametrize("cheat", [FakeObservation, SkipTurn])
def test_cheats_that_play_a_fake_environment_are_caught(world, check, honest, cheat):
    engine, tok, task, lease = world
    faked = submit(generate_turns(engine, cheat.stand_in(task.environment), tok, lease))
    assert faked != honest, "the cheat changed nothing on these seeds"
    verdict = check(faked)
    assert (verdict.outcome, verdict.check) == ("hard", "environment"), verdict


def test_edited_tool_result_is_caught(world, check, honest):
    edited = edit_replies(honest, world[0].model.config.vocab_size)
    assert edited != honest
    verdict = check(edited)
    assert (verdict.outcome, verdict.check) == ("hard", "environment"), verdict


def test_a_model_token_edited_in_a_later_turn_fails_the_proof_or_the_sampler(check, honest):
    t, j = longest(honest)
    c = honest.results[t].completions[j]
    at = c.segments[0] + c.segments[1]  # first token of the second model turn
    tokens = list(c.tokens)
    tokens[at] = 4 + (tokens[at] - 3) % 50
    verdict = check(edit(honest, t, j, tokens=tokens))
    assert verdict.outcome == "hard" and verdict.check in ("toploc", "sampling"), verdict


def test_a_logprob_changed_in_a_later_turn_is_caught_where_it_stands(check, honest):
    """A node reports one logprob per model token; the validator recomputes one per transcript
    token and compares them at the model's rows: a logprob raised in the second model turn is
    caught at its place among the model's tokens, and the honest ones around it pass."""
    t, j = longest(honest)
    c = honest.results[t].completions[j]
    at = c.segments[0]  # the second model turn's first token, counted among the model's
    logprobs = list(c.logprobs)
    logprobs[at] += 0.5
    verdict = check(edit(honest, t, j, logprobs=logprobs))
    assert (verdict.outcome, verdict.check) == ("hard", "logprobs"), verdict
    assert verdict.details["positions"] == [at]


def test_a_reply_dropped_with_its_turn_is_caught(check, honest):
    """Cutting the transcript back to its first turn (a skipped turn, claimed finished)."""
    t, j = longest(honest)
    c = honest.results[t].completions[j]
    first = c.segments[0]
    cut = edit(
        honest,
        t,
        j,
        tokens=c.tokens[:first],
        segments=[first],
        logprobs=c.logprobs[:first],
        proofs=c.proofs[: -(-first // 32)],
    )
    verdict = check(cut)
    assert (verdict.outcome, verdict.check) == ("hard", "environment"), verdict


@pytest.mark.parametrize(
    "change",
    [
        {"segments": []},  # no layout for a multi-turn task
        {"segments": [1, 1]},  # ends with an environment reply
        {"segments": [0, 1, 1]},  # an empty segment
        {"segments": [1]},  # does not cover the tokens
        {"segments": [1] * 9, "tokens": [5] * 9},  # five model turns, the task allows four
        {"segments": [1, 5, 1], "tokens": [5] * 7},  # a reply over max_reply_tokens
        {"tokens": [5] * 200, "segments": [200]},  # longer than any transcript may be
        {"logprobs": []},  # logprobs not one per model token
    ],
)
def test_malformed_transcripts_are_refused_by_structure(check, honest, change):
    verdict = check(edit(honest, **change))
    assert (verdict.outcome, verdict.check) == ("hard", "structure"), verdict


def test_segments_on_a_single_turn_task_are_refused(check, honest):
    verdict = check(honest, make_task("copy", 0))
    assert (verdict.outcome, verdict.check) == ("hard", "structure"), verdict
    assert "single-turn" in verdict.reason


def test_an_environment_that_fails_is_a_soft_reject(world, check, honest, monkeypatch):
    def broken(*_args):
        raise ValueError("environment bug")

    monkeypatch.setattr(world[2].environment, "reply", broken)
    verdict = check(honest)
    assert (verdict.outcome, verdict.check) == ("soft", "environment"), verdict


def test_environment_options_are_checked():
    with pytest.raises(EnvError):
        environment_for("guess", {"max_turns": 99})
    with pytest.raises(EnvError):
        environment_for("guess", {"no_such_option": 1})
    with pytest.raises(EnvError):
        environment_for("guess", {"feedback": "loud"})
    with pytest.raises(EnvError):
        TurnLimits(max_reply_tokens=0)
    assert environment_for("copy", {}) is None


@pytest.mark.parametrize("feedback", ["direction", "reveal"])
def test_the_game_answers_a_miss_and_ends_on_a_hit_or_no_number(feedback):
    env = environment_for("guess", {"feedback": feedback})
    target = env.secret(11)
    miss = (target + 1) % 10
    answer = {"direction": "-" if miss > target else "+", "reveal": f"={target}"}[feedback]
    assert env.reply(11, "", [f"{miss}"]) == answer
    assert env.reply(11, "", [f"{miss}", f"x{target}"]) is None
    assert env.reply(11, "", ["no number"]) is None
