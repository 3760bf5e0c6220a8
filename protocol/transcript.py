"""The layout of a multi-turn transcript, as both sides read it.

A multi-turn completion carries every token after the prompt: model turns and environment
replies, alternating, first and last a model turn. `segments` gives their lengths in that order
(a run-length form of the mask of model-generated tokens). Model turn k is sampled with the seed
`turn_seed(task seed, k)`, positions counted from 0 within the turn, so each turn is exactly a
single-turn completion to the sampler and its checks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.errors import SwarmError


class TranscriptError(SwarmError):
    """A transcript's segments do not describe its tokens."""


@dataclass(frozen=True)
class Segment:
    start: int
    """Offset in the transcript."""
    tokens: list[int]
    by_model: bool


def turn_seed(seed: int, turn: int) -> int:
    """The sampling seed of model turn `turn`: the task's own seed for the first turn (so a
    one-turn rollout samples as a single-turn one), a hash of both after it (63 bits)."""
    if turn == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{turn}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def split_segments(tokens: Sequence[int], segments: Sequence[int]) -> list[Segment]:
    """The segments of a transcript, model turns at even places; raises `TranscriptError` when
    the lengths are not positive, are an even count (the model must have the last turn), or do
    not add up to the tokens."""
    if len(segments) % 2 == 0:
        raise TranscriptError(f"{len(segments)} segments: a transcript ends with a model turn")
    if any(n < 1 for n in segments):
        raise TranscriptError("every segment needs at least one token")
    if sum(segments) != len(tokens):
        raise TranscriptError(
            f"segments cover {sum(segments)} tokens, the transcript has {len(tokens)}"
        )
    out, start = [], 0
    for i, n in enumerate(segments):
        out.append(Segment(start, list(tokens[start : start + n]), i % 2 == 0))
        start += n
    return out


def model_mask(segments: Sequence[Segment]) -> list[bool]:
    """Per transcript token: whether the model generated it (what may carry loss)."""
    return [s.by_model for s in segments for _ in s.tokens]


def model_positions(segments: Sequence[Segment]) -> list[int]:
    """Transcript offsets of the model's tokens, in order."""
    return [s.start + k for s in segments if s.by_model for k in range(len(s.tokens))]
