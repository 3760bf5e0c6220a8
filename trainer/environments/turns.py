"""Training samples of multi-turn transcripts: the loss covers only the model's tokens.

A transcript trains as one sample, prompt + every turn, with the environment's replies masked
out of the loss (`Sample.loss_mask`): they are context the policy conditions on, not actions
it took. One forward covers the whole transcript, and the normaliser of every loss type counts
the model's tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence

from protocol.transcript import model_mask, split_segments
from trainer.grpo import Sample


def transcript_sample(
    prompt_ids: Sequence[int],
    tokens: Sequence[int],
    logprobs: Sequence[float],
    segments: Sequence[int],
    truncated: bool,
) -> Sample:
    """A stored sample as the trainer takes it (`logprobs`: one per transcript token). An
    empty `segments` is a single-turn completion, whose every token carries loss; raises
    `TranscriptError` on a layout that does not fit the tokens."""
    mask = model_mask(split_segments(tokens, segments)) if segments else None
    return Sample(list(prompt_ids), list(tokens), list(logprobs), truncated, mask)
