"""Multi-turn transcripts as training samples: only model turns carry loss."""

import pytest
import torch

from protocol.transcript import TranscriptError
from toploc.models import load_model
from trainer.config import AlgorithmSection
from trainer.environments.turns import transcript_sample
from trainer.grpo import GRPOTrainer, Sample, TrainGroup

PROMPT = [1, 2]
# model [10, 11] | env [20] | model [12] | env [21, 22] | model [13, 14]
TOKENS = [10, 11, 20, 12, 21, 22, 13, 14]
SEGMENTS = [2, 1, 1, 2, 2]
LOGPROBS = [-2.1, -2.2, -9.0, -2.3, -9.0, -9.0, -2.4, -2.5]
MODEL = [True, True, False, True, False, False, True, True]


def test_a_transcript_is_one_sample_whose_environment_tokens_carry_no_loss():
    s = transcript_sample(PROMPT, TOKENS, LOGPROBS, SEGMENTS, truncated=True)
    assert (s.prompt_ids, s.tokens) == (PROMPT, TOKENS) and s.truncated
    assert s.loss_mask == MODEL
    assert transcript_sample(PROMPT, [10, 11], [-0.1, -0.2], [], False).loss_mask is None
    with pytest.raises(TranscriptError):
        transcript_sample(PROMPT, TOKENS, LOGPROBS, [2, 1, 1], truncated=False)


def _trainer() -> GRPOTrainer:
    model, _ = load_model("tiny")
    torch.manual_seed(0)
    settings = AlgorithmSection(lr=1e-3, is_cap=0, loss_type="dapo")
    return GRPOTrainer(model, settings, temperature=1.0, max_new_tokens=8)


def _grads(trainer: GRPOTrainer, groups: list[TrainGroup]) -> torch.Tensor:
    """The flat gradient one step takes (the step is undone: only its gradient is kept)."""
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.step(groups, current_version=0)
    grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    trainer.model.load_state_dict(before)
    return grad


def test_the_masked_transcript_trains_as_its_model_turns_would_alone():
    # Under the token-level loss, the transcript with its environment replies masked is the
    # sum over its model turns, each trained as a completion of the transcript before it.
    # Without the mask, the environment tokens would add their own gradient.
    trainer = _trainer()
    whole = transcript_sample(PROMPT, TOKENS, LOGPROBS, SEGMENTS, truncated=False)
    masked = _grads(trainer, [TrainGroup([whole], [1.0], [0.7], 0)])
    turns = [
        Sample(PROMPT, [10, 11], LOGPROBS[0:2], False),
        Sample(PROMPT + TOKENS[:3], [12], LOGPROBS[3:4], False),
        Sample(PROMPT + TOKENS[:6], [13, 14], LOGPROBS[6:8], False),
    ]
    per_turn = _grads(trainer, [TrainGroup([t], [1.0], [0.7], 0) for t in turns])
    assert torch.allclose(masked, per_turn, rtol=1e-4, atol=1e-7)
    unmasked = Sample(PROMPT, TOKENS, LOGPROBS, False)
    plain = _grads(trainer, [TrainGroup([unmasked], [1.0], [0.7], 0)])
    assert not torch.allclose(masked, plain, rtol=1e-3, atol=1e-6)
