"""When training checkpoints: a fixed count, or auto mode's share of the steps' time."""

import itertools

import pytest

from trainer.checkpoint_pace import CheckpointPace


def test_a_fixed_count_checkpoints_every_nth_step_whatever_the_times():
    pace = CheckpointPace(3)
    due = []
    for step in range(1, 10):
        pace.stepped(0.01)
        due.append(pace.due(step, writing=step == 6))
        pace.checkpointed(100.0)
    assert due == [False, False, True, False, False, True, False, False, True]


def test_auto_keeps_checkpoints_within_their_share_of_the_steps_time():
    """Steps of 0.62 s and checkpoints that block 6.1 s each (the H200's 0.4B figures): one
    after every step would be 91% of the time; auto mode spaces them to at most 10%."""
    pace = CheckpointPace(0)
    step_s, blocked_s, busy, waited = 0.62, 6.1, 0.0, 0.0
    checkpoints = []
    for step in range(1, 2001):
        pace.stepped(step_s)
        busy += step_s
        if pace.due(step, writing=False):
            pace.checkpointed(blocked_s)
            waited += blocked_s
            checkpoints.append(step)
    assert checkpoints[0] == 1  # the first one measures what a checkpoint costs
    gaps = {b - a for a, b in itertools.pairwise(checkpoints)}
    assert gaps == {89}  # 6.1 <= 0.1 * (0.62 * n + 6.1) first at n = 89
    after_first = waited - blocked_s
    assert after_first / (busy + after_first) <= 0.1


def test_auto_never_waits_for_a_write_still_going_and_follows_a_changing_cost():
    pace = CheckpointPace(0)
    pace.stepped(1.0)
    assert pace.due(1, writing=False)
    pace.checkpointed(0.5)  # needs 4.5 s of steps since
    pace.stepped(4.0)
    assert not pace.due(5, writing=False)
    pace.stepped(1.0)
    assert not pace.due(6, writing=True)  # the share is met, but the last write is going
    assert pace.due(6, writing=False)
    pace.checkpointed(0.05)  # cheaper now: due again after 0.45 s of steps
    pace.stepped(0.5)
    assert pace.due(7, writing=False)


@pytest.mark.parametrize("every, share", [(-1, 0.1), (0, 0.0), (0, 1.0)])
def test_a_pace_out_of_range_is_refused(every, share):
    with pytest.raises(ValueError, match="out of range"):
        CheckpointPace(every, share)
