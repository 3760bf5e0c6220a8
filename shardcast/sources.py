"""Choosing where to fetch each shard from: measured goodput, with exploration.

Every source starts with an optimistic prior (so each is tried without any probe file) and
keeps an EMA of the goodput its transfers achieved (bytes of verified data per second,
waiting included). A pick favours goodput divided by the transfers already running there, so
parallel workers spread over sources in proportion to what each delivers; with probability
`explore` it picks at random instead, so a source that was slow once gets measured again.
Failures lower a source's health, which heals back a little on every pick; a source that
served bytes failing their hash is penalised hard and, after `ban_after` such shards, not
used again by this picker.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

EMA_ALPHA = 0.3
OPTIMISTIC_PRIOR = 1e9  # bytes/s: higher than any real source, so untried ones go first
HEAL = 0.05


@dataclass
class SourceStats:
    url: str
    goodput: float = OPTIMISTIC_PRIOR
    health: float = 1.0
    inflight: int = 0
    ok: int = 0
    failed: int = 0
    corrupt: int = 0
    bytes: int = 0
    missing: set[int] = field(default_factory=set)
    """Versions this source said it does not hold (404)."""


class SourcePicker:
    def __init__(
        self, urls: list[str], explore: float = 0.1, ban_after: int = 3, seed: int | None = None
    ) -> None:
        if not urls:
            raise ValueError("at least one source is needed")
        self.stats = {u: SourceStats(u.rstrip("/")) for u in urls}
        self.explore = explore
        self.ban_after = ban_after
        self._rng = random.Random(seed)

    def usable(self, version: int, avoid: set[str] = frozenset()) -> list[SourceStats]:
        live = [
            s
            for s in self.stats.values()
            if s.corrupt < self.ban_after and version not in s.missing
        ]
        preferred = [s for s in live if s.url not in avoid]
        return preferred or live

    def pick(self, version: int, avoid: set[str] = frozenset()) -> SourceStats | None:
        """A source for one transfer of `version`, or None if none is left; `avoid` holds
        sources that already failed this shard (used only if nothing else is left)."""
        candidates = self.usable(version, avoid)
        if not candidates:
            return None
        for s in self.stats.values():
            s.health = min(1.0, s.health + HEAL)
        if len(candidates) > 1 and self._rng.random() < self.explore:
            return self._rng.choice(candidates)
        return max(candidates, key=lambda s: s.goodput * s.health / (1 + s.inflight))

    def record_success(self, s: SourceStats, nbytes: int, seconds: float) -> None:
        sample = nbytes / max(seconds, 1e-6)
        first = s.ok == 0
        s.goodput = sample if first else (1 - EMA_ALPHA) * s.goodput + EMA_ALPHA * sample
        s.ok += 1
        s.bytes += nbytes

    def record_partial(self, s: SourceStats, nbytes: int, seconds: float) -> None:
        """Bytes that arrived before a transfer broke still say something about speed."""
        if nbytes:
            self.record_success(s, nbytes, seconds)
            s.ok -= 1
        self.record_failure(s)

    def record_failure(self, s: SourceStats) -> None:
        s.failed += 1
        s.health *= 0.5

    def record_corrupt(self, s: SourceStats) -> None:
        s.corrupt += 1
        s.health *= 0.1
        s.goodput *= 0.1

    def record_missing(self, s: SourceStats, version: int) -> None:
        s.missing.add(version)
