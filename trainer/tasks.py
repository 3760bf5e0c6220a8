"""Tasks: prompts with their reference columns, reward functions, and how to render a prompt.

Procedural tasks are generated from a seed (same seed, same prompts, on every machine), split
into disjoint train and test sets. The `dataset` task reads any Hugging Face `datasets` source
(`trainer/data.py`); `gsm8k` is the same with GSM8K's columns (`question`, `answer` with
`#### <number>`) and math-verify.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol.environments import Environment
from protocol.errors import SwarmError
from protocol.poolspec import PoolSpec
from trainer.rewards import (
    WeightedReward,
    exact_numeric,
    math_verify_reward,
    parse_rewards,
    position_match,
)


@dataclass(frozen=True)
class Example:
    prompt: str
    """The question, before any chat template."""
    columns: dict[str, Any]
    """Reference fields passed to reward functions by name, e.g. `answer`."""
    messages: tuple[dict[str, str], ...] | None = None
    """A conversational prompt (TRL's format), rendered with the chat template; `prompt` is
    then its last message's text."""


@dataclass
class Task:
    name: str
    train: list[Example]
    test: list[Example]
    rewards: list[WeightedReward]
    chat: bool = False
    """Render prompts with the tokenizer's chat template (instruction-tuned models)."""
    prefill: str = ""
    """Text that opens the assistant's answer, e.g. "The answer is "."""
    options: dict[str, Any] = field(default_factory=dict)
    environment: Environment | None = None
    """Multi-turn tasks: the environment the model's turns are played against (the node runs
    it, the validator replays it)."""

    def render(self, example: Example, tokenizer: Any) -> str:
        """The exact text the model continues."""
        if example.messages is not None and not self.chat:
            raise SwarmError(
                f"task {self.name!r}: a prompt is a chat conversation but chat is off (the "
                "model has no chat template): use a model with one, or plain-text prompts"
            )
        if not self.chat:
            return example.prompt + self.prefill
        messages = list(example.messages or [{"role": "user", "content": example.prompt}])
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + self.prefill


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def _split(
    make: Callable[[random.Random], Example],
    seed: int,
    n_train: int,
    n_test: int,
    space: int | None = None,
):
    """Draw distinct examples; the first `n_test` distinct prompts are the test set. `space`:
    how many distinct prompts `make` can draw, when known. Drawing stops once it has them all,
    with the same examples in the same order as drawing on would give: a 1-digit copy task
    otherwise drew 260,000 times for its 10 prompts, 2 CPU-s in every process that builds it."""
    rng = random.Random(seed)
    seen: dict[str, Example] = {}
    attempts = 0
    wanted = min(n_train + n_test, space or n_train + n_test)
    while len(seen) < wanted and attempts < 50 * (n_train + n_test):
        ex = make(rng)
        seen.setdefault(ex.prompt, ex)
        attempts += 1
    examples = list(seen.values())
    # A small prompt space (e.g. 2-digit copies: 100 prompts) keeps 80% for training.
    n_test = min(n_test, len(examples) // 5)
    return examples[n_test:], examples[:n_test]


def copy_task(seed: int, digits: int = 4, n_train: int = 5000, n_test: int = 200) -> Task:
    def make(rng: random.Random) -> Example:
        s = _digits(rng, digits)
        return Example(f"copy {s}=", {"answer": s})

    train, test = _split(make, seed, n_train, n_test, space=10**digits)
    return Task("copy", train, test, [WeightedReward(position_match)], options={"digits": digits})


def sort_task(seed: int, digits: int = 4, n_train: int = 5000, n_test: int = 200) -> Task:
    def make(rng: random.Random) -> Example:
        s = _digits(rng, digits)
        return Example(f"sort {s}=", {"answer": "".join(sorted(s))})

    train, test = _split(make, seed, n_train, n_test, space=10**digits)
    return Task("sort", train, test, [WeightedReward(position_match)], options={"digits": digits})


def mod_add_task(seed: int, n_train: int = 80, n_test: int = 20) -> Task:
    """a+b mod 10: 100 prompts in all; right or wrong, so a constant answer cannot farm it."""

    def make(rng: random.Random) -> Example:
        a, b = rng.randrange(10), rng.randrange(10)
        return Example(f"{a}+{b}=", {"answer": str((a + b) % 10)})

    train, test = _split(make, seed, n_train, n_test)
    return Task("mod_add", train, test, [WeightedReward(exact_numeric)])


def arithmetic_task(
    seed: int,
    op: str = "+",
    digits: int = 2,
    chat: bool = True,
    prefill: str = "The answer is ",
    n_train: int = 2000,
    n_test: int = 200,
) -> Task:
    """Integer arithmetic by difficulty (`digits` per operand), for pretrained models."""
    if op not in ("+", "-", "*"):
        raise SwarmError(f"arithmetic op must be +, - or *, not {op!r}")

    def make(rng: random.Random) -> Example:
        lo, hi = 10 ** (digits - 1), 10**digits - 1
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return Example(f"What is {a} {op} {b}?", {"answer": str(value)})

    train, test = _split(make, seed, n_train, n_test)
    return Task(
        "arithmetic",
        train,
        test,
        [WeightedReward(exact_numeric)],
        chat=chat,
        prefill=prefill,
        options={"op": op, "digits": digits},
    )


def gsm8k_task(
    path: str, seed: int, test_fraction: float = 0.1, chat: bool = True, prefill: str = ""
) -> Task:
    """GSM8K-format rows (`question`, `answer` ending in `#### <number>`) from any dataset
    source; the gold answer is the number after ####, checked with math-verify."""
    from trainer.data import NO_EVAL_SPLIT, dataset_task

    task = dataset_task(
        seed,
        path,
        eval_split=NO_EVAL_SPLIT,
        prompt_column="question",
        answer_column="answer",
        test_fraction=test_fraction,
        chat=chat,
        prefill=prefill,
    )
    task.name, task.options = "gsm8k", {"path": path}
    task.rewards = [WeightedReward(math_verify_reward)]
    return task


def _dataset_task(**options: Any) -> Task:
    # Imported on use: trainer.data builds on this module's Task and Example.
    from trainer.data import dataset_task

    return dataset_task(**options)


def _guess_task(**options: Any) -> Task:
    # Imported on use: trainer.environments builds on this module's Task and Example.
    from trainer.environments.guess import guess_task

    return guess_task(**options)


def _verifiers_task(**options: Any) -> Task:
    # Imported on use: the verifiers package is optional.
    from trainer.environments.verifiers_task import verifiers_task

    return verifiers_task(**options)


TASKS: dict[str, Callable[..., Task]] = {
    "copy": copy_task,
    "sort": sort_task,
    "mod_add": mod_add_task,
    "arithmetic": arithmetic_task,
    "gsm8k": gsm8k_task,
    "dataset": _dataset_task,
    "guess": _guess_task,
    "verifiers": _verifiers_task,
}


def make_task(
    name: str,
    seed: int,
    options: dict[str, Any] | None = None,
    limit: int | None = None,
    rewards: list[WeightedReward] | None = None,
) -> Task:
    """Build a task by name; `limit` keeps the first N training prompts (X-R1-style subsets);
    `rewards`, when given, replace the task's own reward functions."""
    if name not in TASKS:
        raise SwarmError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    try:
        task = TASKS[name](seed=seed, **(options or {}))
    except TypeError as e:
        raise SwarmError(f"bad options for task {name!r}: {e}") from None
    if limit is not None:
        task.train = task.train[:limit]
    if rewards:
        task.rewards = rewards
    if not task.rewards:
        raise SwarmError(
            f"task {name!r} has no reward: give the dataset an answer column "
            "(--answer-column) or name reward functions (--reward NAME)"
        )
    return task


def pool_task(spec: PoolSpec) -> Task:
    """The task a pool spec names, with its reward functions: what the coordinator trains on
    and every validator, here or on another machine, scores with."""
    rewards = parse_rewards(spec.task.rewards, spec.sampling.max_new_tokens)
    return make_task(spec.task.name, spec.seed, dict(spec.task.options), spec.task.limit, rewards)
