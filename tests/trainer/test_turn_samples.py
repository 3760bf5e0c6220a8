"""Multi-turn transcripts as training samples: only model turns carry loss."""

import pytest

from protocol.transcript import TranscriptError
from trainer.environments.turns import turn_groups, turn_samples

PROMPT = [1, 2]
# model [10, 11] | env [20] | model [12] | env [21, 22] | model [13, 14]
TOKENS = [10, 11, 20, 12, 21, 22, 13, 14]
SEGMENTS = [2, 1, 1, 2, 2]
LOGPROBS = [-0.1, -0.2, -9.0, -0.3, -9.0, -9.0, -0.4, -0.5]


def test_each_model_turn_is_a_sample_with_the_transcript_before_it_as_context():
    samples = turn_samples(PROMPT, TOKENS, LOGPROBS, SEGMENTS, truncated=True)
    assert [s.prompt_ids for s in samples] == [
        [1, 2],
        [1, 2, 10, 11, 20],
        [1, 2, 10, 11, 20, 12, 21, 22],
    ]
    assert [s.tokens for s in samples] == [[10, 11], [12], [13, 14]]
    # environment tokens' logprobs (-9) never reach a sample
    assert [s.behaviour_logprobs for s in samples] == [[-0.1, -0.2], [-0.3], [-0.4, -0.5]]
    # only the last turn can have hit the length cap of the rollout
    assert [s.truncated for s in samples] == [False, False, True]


def test_model_only_logprobs_are_read_in_order():
    model_only = [-0.1, -0.2, -0.3, -0.4, -0.5]
    samples = turn_samples(PROMPT, TOKENS, model_only, SEGMENTS, truncated=False)
    assert [s.behaviour_logprobs for s in samples] == [[-0.1, -0.2], [-0.3], [-0.4, -0.5]]


def test_groups_per_turn_keep_each_transcripts_advantage():
    long = turn_samples(PROMPT, TOKENS, LOGPROBS, SEGMENTS, truncated=False)
    short = turn_samples(PROMPT, [10, 11], [-0.1, -0.2], [2], truncated=False)
    groups = turn_groups([long, short], [1.0, 0.0], [0.7, -0.7], weight_version=3)
    assert [len(g.samples) for g in groups] == [2, 1, 1]
    assert [g.advantages for g in groups] == [[0.7, -0.7], [0.7], [0.7]]
    assert all(g.rewards == [1.0, 0.0] and g.weight_version == 3 for g in groups)


def test_a_bad_layout_is_refused():
    with pytest.raises(TranscriptError):
        turn_samples(PROMPT, TOKENS, LOGPROBS, [2, 1, 1], truncated=False)
