"""When training checkpoints: every N steps, or (N = 0, auto) as often as keeps the steps' wait
on checkpoints within a share of their time.

A checkpoint blocks a step for its staging, plus the previous write if that is still going. On
a CPU a step takes seconds and a checkpoint after each costs a few percent; on a GPU a step of
a 0.4B model took 0.62 s and a checkpoint after each blocked it 6.1 s (docs/scale.md). No one
N suits both, so auto mode measures: it checkpoints once the previous write is done and the
steps since the last checkpoint took long enough that its blocking was at most `share` of
their time together. Steps after the last checkpoint are retrained after a crash (their groups
go back to the queue), so a longer interval costs recomputation, never accepted work.
"""

from __future__ import annotations

AUTO_SHARE = 0.1
"""The share of training time checkpoints may block in auto mode: #12's goal."""


class CheckpointPace:
    def __init__(self, every: int, share: float = AUTO_SHARE) -> None:
        """`every` > 0: a checkpoint every that many steps; 0: auto."""
        if every < 0 or not 0 < share < 1:
            raise ValueError(f"checkpoint every {every} steps, share {share}: out of range")
        self.every = every
        self.share = share
        self._since_s = 0.0
        """Step seconds since the last checkpoint."""
        self._blocked_s = 0.0
        """What the last checkpoint blocked."""

    def stepped(self, seconds: float) -> None:
        """A step took `seconds`."""
        self._since_s += seconds

    def due(self, step: int, writing: bool) -> bool:
        """Whether to checkpoint after `step`; `writing`: the previous write is still going."""
        if self.every:
            return step % self.every == 0
        if writing:
            return False
        return self._blocked_s <= self.share * (self._since_s + self._blocked_s)

    def checkpointed(self, blocked_s: float) -> None:
        """A checkpoint was started; it blocked the step `blocked_s`."""
        self._blocked_s = blocked_s
        self._since_s = 0.0
