"""The number-guessing task (`protocol.environments.guess`): one prompt, a new game per seed."""

from __future__ import annotations

from typing import Any

from protocol.environments.guess import GuessEnvironment, first_integer
from trainer.rewards import WeightedReward
from trainer.tasks import Example, Task

FOUND_BASE = 1.0
TURN_COST = 0.2
"""Finding the number on turn k (from 0) earns FOUND_BASE - TURN_COST * k: fewer guesses,
more reward, so a policy that uses the feedback beats one that guesses blindly."""


class GuessReward:
    """Reward of a game: how early the model named the secret (0 if it never did)."""

    __name__ = "guess_found"

    def __init__(self, env: GuessEnvironment) -> None:
        self.env = env

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        turns: list[list[str]],
        seed: list[int],
        **_: Any,
    ) -> list[float]:
        return [self._one(t, s) for t, s in zip(turns, seed, strict=True)]

    def _one(self, turns: list[str], seed: int) -> float:
        target = self.env.secret(seed)
        for k, text in enumerate(turns):
            if first_integer(text) == target:
                return max(FOUND_BASE - TURN_COST * k, 0.0)
        return 0.0


TRAIN_PROMPTS, TEST_PROMPTS = 256, 32


def guess_task(seed: int, **options: Any) -> Task:
    """Games against `GuessEnvironment(**options)` (the options nodes build it from, so no
    others). Every prompt is the same text: the game is drawn from each lease task's seed, so
    prompts only count how many games a pass holds."""
    env = GuessEnvironment(**options)
    example = Example(env.prompt(), {})
    return Task(
        "guess",
        [example] * TRAIN_PROMPTS,
        [example] * TEST_PROMPTS,
        [WeightedReward(GuessReward(env))],
        options=dict(options),
        environment=env,
    )
