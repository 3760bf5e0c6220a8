"""Evaluation of a multi-turn task: whole games played by the nodes' turn loop, scored by the
task's rewards as the coordinator scores transcripts."""

import json
import math
import re
from types import SimpleNamespace

import pytest
import trio

from protocol.environments.guess import secret
from toploc import capture_hf
from toploc.models import load_model
from toploc.sampling import SamplingParams
from trainer.evaluate import evaluate, sample_seed
from trainer.evaluating import EvalService
from trainer.metrics import EVALS_FILE, RunLog
from trainer.policy import PolicyStore
from trainer.tasks import make_task

GAMES = 32
BISECT_TURNS = {0: 3, 1: 2, 2: 3, 3: 4, 4: 1, 5: 3, 6: 4, 7: 2, 8: 3, 9: 4}
"""Guesses a bisection of 0-9 (guess (low + high) // 2, first 4) takes to find each secret,
worked out by hand."""


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def scripted(tok, policy):
    """A stand-in for `capture_hf.generate` whose turn is `policy(context text, seed)`."""

    def generate(model, prompts, params, seeds, sample_indices=None, **_):
        contexts = [tok.decode(p, skip_special_tokens=True) for p in prompts]
        texts = [policy(c, s) for c, s in zip(contexts, seeds, strict=True)]
        ids = [tok.encode(t, add_special_tokens=False) for t in texts]
        return [SimpleNamespace(completion_ids=i, finish_reason="stop") for i in ids]

    return generate


def oracle(context, seed):
    # Turn 0 is sampled with the game's own seed: the policy reads the secret off it.
    return str(secret(seed, 0, 9))


def bisect(context, seed):
    low, high = 0, 9
    for guess, sign in re.findall(r"(\d+)([+-])", context.split(":", 1)[1]):
        low, high = (int(guess) + 1, high) if sign == "+" else (low, int(guess) - 1)
    return str((low + high) // 2)


def test_the_tiny_model_plays_whole_games_deterministically(tiny):
    model, tok = tiny
    task = make_task("guess", 0, {"max_turns": 3})
    a = evaluate(model, tok, task, limit=4, max_new_tokens=4, progress=False, k=3)
    b = evaluate(model, tok, task, limit=4, max_new_tokens=4, progress=False, k=3)
    assert a == b
    keys = ["accuracy", "mean_reward", "pass@1", "pass@k", "mean_turns", "rewarded"]
    assert all(math.isfinite(a[k]) for k in keys)
    assert 1 < a["mean_turns"] <= 3  # the environment answered: more than one turn was played
    # the transcript shows the environment's replies between the model's turns
    assert any(c in a["examples"][0]["completion"] for c in "+-")


@pytest.mark.parametrize(
    ("policy", "want"),
    [
        (oracle, {"accuracy": 1.0, "mean_reward": 1.0, "mean_turns": 1.0, "rewarded": 1.0}),
        # out of range: never a hit, so the game runs to the turn cap
        (lambda c, s: "55", {"accuracy": 0, "mean_reward": 0, "mean_turns": 4, "rewarded": 0}),
        # no number: the game ends after the first turn
        (lambda c, s: "x", {"accuracy": 0, "mean_reward": 0, "mean_turns": 1, "rewarded": 0}),
    ],
)
def test_a_scripted_policy_scores_what_it_plays(tiny, monkeypatch, policy, want):
    model, tok = tiny
    monkeypatch.setattr(capture_hf, "generate", scripted(tok, policy))
    got = evaluate(model, tok, make_task("guess", 0, {}), progress=False, k=2)
    assert got["n"] == GAMES
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert got["pass@1"] == got["pass@k"] == want["accuracy"]


def test_a_bisection_wins_every_game_in_the_turns_it_needs(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(capture_hf, "generate", scripted(tok, bisect))
    got = evaluate(model, tok, make_task("guess", 0, {}), progress=False, seed=5)
    secrets = [secret(sample_seed(5, i), 0, 9) for i in range(GAMES)]
    turns = [BISECT_TURNS[s] for s in secrets]
    assert got["rewarded"] == 1.0
    assert got["mean_turns"] == pytest.approx(sum(turns) / GAMES)
    assert got["mean_reward"] == pytest.approx(sum(1.2 - 0.2 * t for t in turns) / GAMES)
    assert got["accuracy"] == secrets.count(4) / GAMES  # full reward: found on the first guess
    assert len(set(secrets)) > 1  # each held-out prompt is a game of its own


def test_in_run_evaluation_of_a_guess_pool(tiny, tmp_path):
    model, tok = tiny
    task = make_task("guess", 0, {"max_turns": 3})
    policy = PolicyStore(tmp_path / "weights", "float32", 4, 1)
    policy.export(model, tok, 1)
    log = RunLog(tmp_path / "logs")
    sampling = SamplingParams(temperature=1.0, max_tokens=3)
    service = EvalService(task, tok, policy, log, 1, 4, 2, sampling, 0)
    assert trio.run(service.run, 1) is not None
    (row,) = [json.loads(line) for line in (tmp_path / "logs" / EVALS_FILE).open()]
    assert row["eval_prompts"] == 4 and 1 < row["eval_mean_turns"] <= 3
    assert {"eval_accuracy", "eval_mean_reward", "eval_rewarded", "eval_pass@k"} <= set(row)
    text = log.prometheus().decode()  # the games won reach Prometheus (and the dashboard)
    assert f"swarmrl_eval_rewarded {float(row['eval_rewarded'])}" in text


def test_the_eval_command_plays_a_guess_pool(tmp_path):
    from trainer.cli import main

    out = tmp_path / "eval.json"
    args = ["eval", "--model", "tiny", "--task", "guess", "--option", "max_turns=3"]
    args += ["--limit", "3", "--max-new-tokens", "2", "--k", "2", "--output", str(out)]
    assert main(args) == 0
    got = json.loads(out.read_text())
    assert got["task"] == "guess" and got["n"] == 3 and got["k"] == 2
    assert 1 <= got["mean_turns"] <= 3 and {"pass@1", "pass@k", "rewarded"} <= set(got)


def test_a_guess_pool_coordinator_evaluates_its_published_version(tmp_path):
    from tests.trainer.pools import tiny_coordinator
    from trainer.config import TrainerConfig, TrainerSection

    config = TrainerConfig(trainer=TrainerSection(eval_every=1, eval_prompts=2, eval_k=2))
    guess = {"name": "guess", "options": {"max_turns": 2}}
    coord = tiny_coordinator(tmp_path, config, max_steps=0, task=guess)
    try:
        trio.run(coord.training.ensure_published, 0)
        metrics = trio.run(coord.training.evaluator.run, 0)
    finally:
        coord.close()
    assert metrics["eval_prompts"] == 2 and metrics["eval_k"] == 2
    assert 1 <= metrics["eval_mean_turns"] <= 2
