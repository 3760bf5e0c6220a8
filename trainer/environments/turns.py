"""Training samples of multi-turn transcripts: the loss covers only the model's tokens.

A transcript is cut at every model turn: turn k becomes a sample whose prompt is the original
prompt plus the transcript before that turn (earlier model turns and environment replies alike,
as context), whose tokens are the turn's own, with the transcript's advantage. Under the
token-level loss (`loss_type = "dapo"`) the sum over these samples is exactly the transcript's
loss with environment tokens masked out: same contexts, same tokens, same normaliser.
"""

from __future__ import annotations

from collections.abc import Sequence

from protocol.transcript import split_segments
from trainer.grpo import Sample, TrainGroup


def turn_samples(
    prompt_ids: Sequence[int],
    tokens: Sequence[int],
    logprobs: Sequence[float],
    segments: Sequence[int],
    truncated: bool,
) -> list[Sample]:
    """One sample per model turn of a transcript (`logprobs`: one per transcript token, or one
    per model token)."""
    parts = split_segments(tokens, segments)
    per_token = len(logprobs) == len(tokens)
    out, model_seen = [], 0
    for s in parts:
        if not s.by_model:
            continue
        n = len(s.tokens)
        lp = logprobs[s.start : s.start + n] if per_token else logprobs[model_seen : model_seen + n]
        model_seen += n
        last = s.start + n == len(tokens)
        out.append(
            Sample(
                list(prompt_ids) + list(tokens[: s.start]), s.tokens, list(lp), truncated and last
            )
        )
    return out


def turn_groups(
    samples: Sequence[list[Sample]],
    rewards: list[float],
    advantages: list[float],
    weight_version: int,
    group_id: int = -1,
) -> list[TrainGroup]:
    """A group's transcripts (each as its `turn_samples`) as one train group per turn index:
    group k holds every transcript's turn k with that transcript's advantage, and keeps the
    whole group's rewards (they are only reported)."""
    turns = max(len(s) for s in samples)
    return [
        TrainGroup(
            [s[k] for s in samples if k < len(s)],
            rewards,
            [a for s, a in zip(samples, advantages, strict=True) if k < len(s)],
            weight_version,
            group_id,
        )
        for k in range(turns)
    ]
