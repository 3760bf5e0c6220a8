"""The number-guessing task (`protocol.environments.guess`): one prompt, a new game per seed."""

from __future__ import annotations

from typing import Any

from protocol.environments.guess import GuessEnvironment
from trainer.rewards import WeightedReward, guess_found
from trainer.tasks import Example, Task

TRAIN_PROMPTS, TEST_PROMPTS = 256, 32


def guess_task(seed: int, **options: Any) -> Task:
    """Games against `GuessEnvironment(**options)` (the options nodes build it from, so no
    others). Every prompt is the same text: the game is drawn from each lease task's seed, so
    prompts only count how many games a pass holds."""
    env = GuessEnvironment(**options)
    example = Example(env.prompt(), {"low": env.low, "high": env.high})
    return Task(
        "guess",
        [example] * TRAIN_PROMPTS,
        [example] * TEST_PROMPTS,
        [WeightedReward(guess_found)],
        options=dict(options),
        environment=env,
    )
