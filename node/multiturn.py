"""The node's turn loop for multi-turn tasks: generate a turn, let the environment answer,
generate the next, and submit the whole transcript with proofs of the model's tokens.

Each model turn is an ordinary seeded generation (the engine's own sampler and capture) over the
prompt and the transcript so far, with the turn's seed (`protocol.transcript.turn_seed`); the
environment's replies come from `protocol.environments.reply_tokens`, the function the
coordinator replays with. All rollouts of a lease advance turn by turn in batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

import toploc
from node.engine import HFEngine, lease_jobs, sampling_params
from protocol import messages as msg
from protocol.environments import Environment, reply_tokens
from protocol.transcript import turn_seed


@dataclass
class _Transcript:
    """One rollout in progress."""

    task: int
    sample: int
    prompt_ids: list[int]
    seed: int
    tokens: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    turns: list[list[int]] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    finish_reason: str = "length"

    def add_turn(self, rollout: Any) -> None:
        ids = list(rollout.completion_ids)
        self.tokens += ids
        self.segments.append(len(ids))
        self.turns.append(ids)
        self.logprobs += rollout.logprobs
        self.hidden.append(rollout.hidden)
        self.finish_reason = rollout.finish_reason

    def add_reply(self, ids: list[int]) -> None:
        self.tokens += ids
        self.segments.append(len(ids))

    def completion(self) -> msg.Completion:
        return msg.Completion(
            tokens=self.tokens,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            proofs=toploc.build_proofs(torch.cat(self.hidden)),
            segments=self.segments,
        )


class TurnEngine:
    """An engine whose `generate` runs the turn loop: what the worker hands its behaviour for
    a multi-turn pool, so a behaviour (honest or not) sees the same engine interface."""

    def __init__(self, engine: HFEngine, env: Environment) -> None:
        self.engine = engine
        self.env = env
        self.name = engine.name

    @property
    def version(self) -> int:
        return self.engine.version

    def load(self, folder: Path, version: int) -> None:
        self.engine.load(folder, version)

    def generate(self, lease: msg.Lease) -> list[msg.TaskResult]:
        return generate_turns(self.engine, self.env, self.tokenizer(), lease)

    def tokenizer(self) -> Any:
        """The loaded weights' tokenizer (the environment's text becomes tokens with it)."""
        if self.engine.model is None:
            raise RuntimeError("no weights loaded")
        return _tokenizer(str(self.engine.model.name_or_path))


@lru_cache(maxsize=2)
def _tokenizer(folder: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@torch.no_grad()
def generate_turns(
    engine: HFEngine, env: Environment, tokenizer: Any, lease: msg.Lease
) -> list[msg.TaskResult]:
    """Every rollout of `lease` played to its end against `env`, in the lease's task order."""
    from toploc import capture_hf

    params = sampling_params(lease)
    rollouts = [_Transcript(t, j, prompt, seed) for t, j, prompt, seed in lease_jobs(lease)]
    t0 = time.perf_counter()
    active, turn = rollouts, 0
    while active:
        for start in range(0, len(active), engine.max_batch):
            part = active[start : start + engine.max_batch]
            made = capture_hf.generate(
                engine.model,
                [r.prompt_ids + r.tokens for r in part],
                params,
                [turn_seed(r.seed, turn) for r in part],
                sample_indices=[r.sample for r in part],
                pad_token_id=engine.pad_token_id,
            )
            for r, m in zip(part, made, strict=True):
                r.add_turn(m)
        going = []
        for r in active:
            reply = reply_tokens(env, tokenizer, r.seed, r.prompt_ids, r.turns)
            if reply is not None:
                r.add_reply(reply)
                going.append(r)
        active, turn = going, turn + 1
    engine.seconds_generating += time.perf_counter() - t0
    done = {(r.task, r.sample): r.completion() for r in rollouts}
    return [
        msg.TaskResult(task_index=t, completions=[done[(t, j)] for j in range(task.group_size)])
        for t, task in enumerate(lease.tasks)
    ]
