"""The node's turn loop for multi-turn tasks: generate a turn, let the environment answer,
generate the next, and submit the whole transcript with proofs of the model's tokens.

The loop itself is `protocol.environments.episodes.play` (the coordinator's evaluation plays
with it too): each model turn is an ordinary seeded generation (the engine's own sampler and
capture) over the prompt and the transcript so far, with the turn's seed; the environment's
replies come from the function the coordinator replays with. All rollouts of a lease advance
turn by turn in batches.
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
from protocol.environments import Environment
from protocol.environments.episodes import Episode, play


@dataclass
class _Transcript(Episode):
    """One rollout in progress, with what its proofs and logprobs need."""

    task: int = 0
    logprobs: list[float] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)

    def add_turn(self, rollout: Any) -> None:
        super().add_turn(rollout)
        self.logprobs += rollout.logprobs
        self.hidden.append(rollout.hidden)

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
    rollouts = [
        _Transcript(prompt, seed, sample=j, task=t) for t, j, prompt, seed in lease_jobs(lease)
    ]
    pad = engine.pad_token_id

    def turn(contexts: list[list[int]], seeds: list[int], samples: list[int]) -> list[Any]:
        return capture_hf.generate(
            engine.model, contexts, params, seeds, sample_indices=samples, pad_token_id=pad
        )

    t0 = time.perf_counter()
    play(rollouts, env, tokenizer, turn, engine.max_batch)
    engine.seconds_generating += time.perf_counter() - t0
    done = {(r.task, r.sample): r.completion() for r in rollouts}
    return [
        msg.TaskResult(task_index=t, completions=[done[(t, j)] for j in range(task.group_size)])
        for t, task in enumerate(lease.tasks)
    ]
