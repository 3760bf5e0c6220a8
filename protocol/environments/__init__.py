"""Environments of multi-turn tasks: the part of a task that both sides run.

A multi-turn rollout alternates segments: the model generates a turn (seeded, proven), the
environment answers (a tool result, feedback), the model goes on. The coordinator checks the
environment's segments by running the environment again, so an environment must be a
deterministic function of the lease seed, the prompt and the model's turns so far: no clock, no
randomness of its own, no network. Nodes and the coordinator both build it from the pool spec's
task name and options (node and trainer never import each other, so it lives here).

`reply_tokens` is the one place where an environment's answer becomes token ids; the turn loop
(`episodes.play`: the node's rollouts and the coordinator's evaluation) and the validator's
replay both call it, so they cannot disagree on the rules (turn cap, reply cap, tokenisation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from protocol.errors import SwarmError

MAX_TURNS = 16
"""Hard ceiling on model turns per rollout, whatever a pool spec asks: each turn costs the
coordinator one environment step and the node one more generation."""
MAX_REPLY_TOKENS = 1024
"""Hard ceiling on the tokens of one environment reply."""


class EnvError(SwarmError):
    """An environment is unknown, misconfigured, or broke its contract."""


@dataclass(frozen=True)
class TurnLimits:
    """How long a rollout may run: part of the task options, so of the hashed pool spec."""

    max_turns: int = 4
    """Model turns per rollout; the environment is not asked after the last one."""
    max_reply_tokens: int = 16
    """Tokens of one environment reply; a longer reply is cut there (on both sides alike)."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_turns <= MAX_TURNS:
            raise EnvError(f"max_turns must be 1 to {MAX_TURNS}, not {self.max_turns}")
        if not 1 <= self.max_reply_tokens <= MAX_REPLY_TOKENS:
            raise EnvError(
                f"max_reply_tokens must be 1 to {MAX_REPLY_TOKENS}, not {self.max_reply_tokens}"
            )

    def max_transcript_tokens(self, max_new_tokens: int) -> int:
        """The longest transcript these limits allow with `max_new_tokens` per model turn."""
        return self.max_turns * max_new_tokens + (self.max_turns - 1) * self.max_reply_tokens


class Environment(Protocol):
    limits: TurnLimits

    def reply(self, seed: int, prompt: str, turns: Sequence[str]) -> str | None:
        """The environment's answer to the model's latest turn (`turns[-1]`; `turns` holds
        every model turn so far, as text), or None when the episode is over. Must depend on
        nothing but its arguments and the environment's options."""
        ...


def reply_tokens(
    env: Environment,
    tokenizer: Any,
    seed: int,
    prompt_ids: Sequence[int],
    turns: Sequence[Sequence[int]],
) -> list[int] | None:
    """The token ids of the environment's reply after the model's `turns` (token ids), or None
    when the rollout ends there (the turn cap was reached, the environment ended it, or it
    replied nothing). Text is decoded without special tokens (a turn's EOS is not text)."""
    if len(turns) >= env.limits.max_turns:
        return None
    prompt = tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    texts = [tokenizer.decode(list(t), skip_special_tokens=True) for t in turns]
    text = env.reply(seed, prompt, texts)
    if not text:
        return None
    ids = tokenizer.encode(text, add_special_tokens=False)
    return list(ids[: env.limits.max_reply_tokens]) or None


def environment_for(task: str, options: dict[str, Any]) -> Environment | None:
    """The environment of a task named in a pool spec, or None for a single-turn task."""
    factory = _registry().get(task)
    if factory is None:
        return None
    try:
        return factory(**options)
    except TypeError as e:
        raise EnvError(f"bad options for the environment of task {task!r}: {e}") from None


def _registry() -> dict[str, Callable[..., Environment]]:
    # Imported on use: an adapter may need an optional package.
    from protocol.environments.guess import GuessEnvironment

    return {"guess": GuessEnvironment}
