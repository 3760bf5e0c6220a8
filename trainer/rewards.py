"""Reward functions, in TRL's shape: `f(prompts, completions, **columns) -> list[float | None]`.

`columns` are the task's other fields (e.g. `answer`), so TRL reward functions plug in as they
are. A function may be sync or async. `None` means "no opinion" for that sample (it counts as 0
in the weighted sum). Rewards are always computed on the coordinator, never taken from nodes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import inspect
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.environments.guess import first_integer, secret
from protocol.errors import SwarmError
from trainer.environments.verifiers_reward import verifiers_reward

RewardFunc = Callable[..., Any]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_ANSWER = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def extract_number(text: str) -> float | None:
    """The answer a completion gives: inside <answer> tags if present, after '####' if present,
    else the first number in the text."""
    if m := _ANSWER_TAG.search(text):
        text = m.group(1)
    elif "####" in text:
        text = text.split("####", 1)[1]
    m = _NUMBER.search(text)
    if m is None:
        return None
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:
        return None


def exact_numeric(
    prompts: list[str], completions: list[str], answer: list[Any], **_: Any
) -> list[float]:
    """1 when the completion's number equals the answer, else 0."""
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        got, want = extract_number(completion), extract_number(str(gold))
        out.append(1.0 if got is not None and want is not None and math.isclose(got, want) else 0.0)
    return out


def math_verify_reward(
    prompts: list[str], completions: list[str], answer: list[Any], **_: Any
) -> list[float]:
    """1 when Hugging Face's math-verify finds the completion's answer equal to the gold one."""
    from math_verify import parse, verify

    # Its own signal-based timeouts work only in a main thread, and it warns each call that they
    # are off; `score` bounds the time of every call instead.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        try:
            ok = verify(
                parse(f"${gold}$", parsing_timeout=None),
                parse(completion, parsing_timeout=None),
                timeout_seconds=None,
            )
        except Exception:  # math-verify raises many kinds on odd LaTeX: such an answer is wrong
            ok = False
        out.append(1.0 if ok else 0.0)
    return out


def format_reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1 for `<think>...</think><answer>...</answer>`, else 0."""
    return [1.0 if _THINK_ANSWER.match(c) else 0.0 for c in completions]


def length_penalty(max_chars: int, coef: float = 1.0) -> RewardFunc:
    """A penalty growing linearly from 0 at half of `max_chars` to -coef at `max_chars`."""

    def penalty(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        half = max_chars / 2
        return [-coef * min(max(len(c) - half, 0) / half, 1.0) for c in completions]

    penalty.__name__ = "length_penalty"
    return penalty


def position_match(
    prompts: list[str], completions: list[str], answer: list[Any], **_: Any
) -> list[float]:
    """Dense partial credit: characters in the right place, over the longer of the completion
    and the answer (so extra characters cost credit, and a constant earns none it did not hit)."""
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        gold = str(gold)
        got = completion.strip()
        hits = sum(a == b for a, b in zip(got, gold, strict=False))
        out.append(hits / max(len(got), len(gold), 1))
    return out


GUESS_TURN_COST = 0.2
"""Finding the number on turn k (from 0) earns 1 - GUESS_TURN_COST * k: fewer guesses, more
reward, so a policy that uses the feedback beats one that guesses blindly."""


def guess_found(
    prompts: list[str],
    completions: list[str],
    turns: list[list[str]],
    seed: list[int],
    low: list[int],
    high: list[int],
    **_: Any,
) -> list[float]:
    """The guessing game (`protocol.environments.guess`): how early a model turn named the
    secret of the game's seed, 0 if none did."""
    out = []
    for texts, s, lo, hi in zip(turns, seed, low, high, strict=True):
        target = secret(s, lo, hi)
        hit = next((k for k, t in enumerate(texts) if first_integer(t) == target), None)
        out.append(0.0 if hit is None else max(1.0 - GUESS_TURN_COST * hit, 0.0))
    return out


BUILTIN: dict[str, RewardFunc] = {
    "exact_numeric": exact_numeric,
    "math_verify": math_verify_reward,
    "format": format_reward,
    "position_match": position_match,
    "guess_found": guess_found,
    "verifiers": verifiers_reward,
}


def parse_rewards(entries: Sequence[str], max_new_tokens: int = 256) -> list[WeightedReward]:
    """`NAME` or `NAME*WEIGHT` entries: a built-in name, `length_penalty` (scaled to the
    completion length cap, in characters), or `package.module:function`."""
    out = []
    for entry in entries:
        name, _, weight = entry.partition("*")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise SwarmError(f"reward {entry!r}: weight {weight!r} is not a number") from None
        name = name.strip()
        if name == "length_penalty":
            func = length_penalty(max_chars=max_new_tokens * 4)
        elif name in BUILTIN:
            func = BUILTIN[name]
        elif ":" in name:
            module, _, attr = name.partition(":")
            try:
                func = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise SwarmError(f"reward {name!r} cannot be imported: {e}") from None
        else:
            known = ", ".join([*sorted(BUILTIN), "length_penalty", "package.module:function"])
            raise SwarmError(f"unknown reward {name!r}; use one of {known}")
        out.append(WeightedReward(func, w))
    return out


@dataclass(frozen=True)
class WeightedReward:
    func: RewardFunc
    weight: float = 1.0

    @property
    def name(self) -> str:
        return getattr(self.func, "__name__", type(self.func).__name__)


def score(
    rewards: Sequence[WeightedReward],
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list[Any]],
    timeout_s: float = 10.0,
    executor: concurrent.futures.Executor | None = None,
) -> tuple[list[float], dict[str, list[float | None]]]:
    """Weighted sum of every reward function per sample, and each function's own values.

    Each call is bounded by `timeout_s`; a function that times out, raises, or returns the wrong
    number of values scores None for its samples (and the error is reported in `per_func` as
    None values), so one bad reward function cannot stall or crash the coordinator.
    """
    per_func: dict[str, list[float | None]] = {}
    own = executor is None
    pool = executor or concurrent.futures.ThreadPoolExecutor(max_workers=max(len(rewards), 1))
    try:
        futures = {
            r.name: pool.submit(_call, r.func, prompts, completions, columns) for r in rewards
        }
        for r in rewards:
            try:
                values = futures[r.name].result(timeout=timeout_s)
            except concurrent.futures.TimeoutError:
                values = [None] * len(completions)
            except Exception:  # a user's reward function failing is data, not a crash
                values = [None] * len(completions)
            if len(values) != len(completions):
                values = [None] * len(completions)
            per_func[r.name] = [None if v is None else float(v) for v in values]
    finally:
        if own:
            pool.shutdown(wait=False, cancel_futures=True)
    totals = [
        sum(r.weight * (per_func[r.name][i] or 0.0) for r in rewards)
        for i in range(len(completions))
    ]
    return totals, per_func


def score_games(
    rewards: Sequence[WeightedReward],
    prompts: list[str],
    turns: list[list[str]],
    seeds: list[int],
    columns: dict[str, list[Any]],
) -> tuple[list[float], dict[str, list[float | None]]]:
    """`score` for played games (multi-turn), as validation and evaluation both judge them:
    the model's last turn is the completion, and the whole game is in the `turns` column (the
    model's turns as text) and `seed` (what the environment was played with)."""
    answers = [t[-1] for t in turns]
    return score(rewards, prompts, answers, columns | {"turns": turns, "seed": seeds})


def _call(
    func: RewardFunc, prompts: list[str], completions: list[str], columns: dict[str, list[Any]]
):
    result = func(prompts=prompts, completions=completions, **columns)
    if inspect.isawaitable(result):
        result = asyncio.run(_await(result))
    return list(result)


async def _await(awaitable):
    return await awaitable
