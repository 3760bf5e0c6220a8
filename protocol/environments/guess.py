"""A number-guessing game: the model guesses, the environment says higher or lower.

The secret is drawn from the lease seed, so every sample of a group plays the same game and the
coordinator can replay it; the model never sees the secret, only the feedback. A tiny random
model finds the answer by luck often enough to get a signal, and can learn to use the feedback
(a binary search finds any of 0-9 in four guesses).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from protocol.environments import EnvError, TurnLimits

_INTEGER = re.compile(r"\d+")
HIGHER, LOWER = "+", "-"
FEEDBACK = ("direction", "reveal")
"""direction: the environment says + (higher) or - (lower); reveal: it says the number (`=7`), a
lookup tool whose answer the model has to read and repeat: the easiest way to learn from an
environment's tokens."""


class GuessEnvironment:
    def __init__(
        self,
        low: int = 0,
        high: int = 9,
        max_turns: int = 4,
        max_reply_tokens: int = 4,
        feedback: str = "direction",
    ) -> None:
        if not 0 <= low < high < 10**6:
            raise EnvError(f"guess needs 0 <= low < high < 10**6, not low={low} high={high}")
        if feedback not in FEEDBACK:
            raise EnvError(f"guess feedback must be one of {FEEDBACK}, not {feedback!r}")
        self.low, self.high, self.feedback = low, high, feedback
        self.limits = TurnLimits(max_turns, max_reply_tokens)

    def secret(self, seed: int) -> int:
        """The number to find in the game of `seed`."""
        return secret(seed, self.low, self.high)

    def reply(self, seed: int, prompt: str, turns: Sequence[str]) -> str | None:
        """Higher or lower (or the number); None (the game is over) on a hit or on a turn
        without a number."""
        guess = first_integer(turns[-1])
        if guess is None:
            return None
        target = self.secret(seed)
        if guess == target:
            return None
        if self.feedback == "reveal":
            return f"={target}"
        return HIGHER if target > guess else LOWER

    def prompt(self) -> str:
        return f"guess {self.low}-{self.high}:"


def secret(seed: int, low: int, high: int) -> int:
    """The number to find in the game of `seed` on [low, high]."""
    digest = hashlib.blake2b(seed.to_bytes(8, "big"), digest_size=8).digest()
    return low + int.from_bytes(digest, "big") % (high - low + 1)


def first_integer(text: str) -> int | None:
    """The first run of digits in `text`, or None (an over-long one counts as none)."""
    m = _INTEGER.search(text)
    return int(m.group()) if m and len(m.group()) <= 9 else None
