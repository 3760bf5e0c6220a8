"""The turn loop of multi-turn episodes: a model turn, the environment's reply, the next turn.

One loop for everyone who plays an environment with a model: the node's rollouts
(`node.multiturn`, proofs captured) and the coordinator's evaluation (`trainer.evaluate`, no
proofs), so an evaluated episode is played exactly as a trained one. The model is a `Generate`
callable, so this module needs no torch: model turn k of an episode is sampled with
`turn_seed(episode seed, k)` over the prompt and the transcript so far, and the replies come
from `reply_tokens`, the function the coordinator's replay calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from protocol.environments import Environment, reply_tokens
from protocol.transcript import turn_seed

Generate = Callable[[list[list[int]], list[int], list[int]], Sequence[Any]]
"""(contexts, seeds, sample indices) -> one rollout per context, each with `completion_ids` and
`finish_reason` (a `toploc.capture_hf.Rollout`)."""


@dataclass
class Episode:
    """One episode in progress: the transcript after the prompt, in segments."""

    prompt_ids: list[int]
    seed: int
    """The game's seed: the environment is played with it, turn seeds derive from it."""
    sample: int = 0
    tokens: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    turns: list[list[int]] = field(default_factory=list)
    """The model's turns, as token ids."""
    finish_reason: str = "length"

    def add_turn(self, rollout: Any) -> None:
        ids = list(rollout.completion_ids)
        self.tokens += ids
        self.segments.append(len(ids))
        self.turns.append(ids)
        self.finish_reason = rollout.finish_reason

    def add_reply(self, ids: list[int]) -> None:
        self.tokens += ids
        self.segments.append(len(ids))


E = TypeVar("E", bound=Episode)


def play(
    episodes: Sequence[E], env: Environment, tokenizer: Any, generate: Generate, batch: int
) -> Sequence[E]:
    """Every episode played to its end against `env`, turn by turn, `batch` contexts per
    `generate` call; returns `episodes` (filled in place)."""
    active, turn = list(episodes), 0
    while active:
        for start in range(0, len(active), batch):
            part = active[start : start + batch]
            made = generate(
                [e.prompt_ids + e.tokens for e in part],
                [turn_seed(e.seed, turn) for e in part],
                [e.sample for e in part],
            )
            for e, m in zip(part, made, strict=True):
                e.add_turn(m)
        active, turn = [e for e in active if _answered(env, tokenizer, e)], turn + 1
    return episodes


def _answered(env: Environment, tokenizer: Any, episode: Episode) -> bool:
    """Whether the environment replied to the episode's last turn (the reply is added)."""
    reply = reply_tokens(env, tokenizer, episode.seed, episode.prompt_ids, episode.turns)
    if reply is None:
        return False
    episode.add_reply(reply)
    return True
