"""Choosing where to fetch each shard from: measured goodput, with exploration.

Every source starts with an optimistic prior (so each is tried without any probe file) and
keeps an EMA of the goodput its transfers achieved (bytes of verified data per second,
waiting included). A pick favours goodput divided by the transfers already running there, so
parallel workers spread over sources in proportion to what each delivers; with probability
`explore` it picks at random instead, so a source that was slow once gets measured again.
Failures lower a source's health, which heals back a little on every pick; a source that
served bytes failing their hash is penalised hard and, after `ban_after` such shards, not
used again by this picker.

A source is not asked for a version for a while after it answered 404 for it
(`MISSING_RECHECK_S`; `NOT_YET_RECHECK_S` for a version newer than all it listed), or after a
transfer from it was abandoned for falling below the minimum rate (`FAULTY_RECHECK_S`). The
marks expire: a picker lives as long as its client or relay, and a source that lacked a
version a moment ago (its own upstream was down, say) may hold it now; a permanent mark left
a node whose only source is its own relay unable to fetch that version ever again. A
source caught listing a version it does not hold has its listings ignored for a while
(doubling with each lie), so a liar cannot steer "latest" forever.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

EMA_ALPHA = 0.3
OPTIMISTIC_PRIOR = 1e9  # bytes/s: higher than any real source, so untried ones go first
HEAL = 0.05
LIE_QUARANTINE = 2.0  # seconds a caught liar's listings are ignored, doubled per lie
MAX_QUARANTINE = 600.0
MAX_STREAMS_BELIEVED = 64  # a peer's claimed streams past this count as this many
MAX_LISTED = 64  # versions remembered per listing: a listing may be long, memory may not
MISSING_RECHECK_S = 5.0  # a 404 for a version it listed, or below its newest: ask again after
NOT_YET_RECHECK_S = 0.5  # a 404 for a version above all it listed: it is likely mirroring it
FAULTY_RECHECK_S = 30.0  # a source too slow for a version gets another chance after this long


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
    missing: dict[int, float] = field(default_factory=dict)
    """Versions this source said it does not hold (404) -> when it may be asked again."""
    faulty: dict[int, float] = field(default_factory=dict)
    """Versions this source is at fault for (stalled, trickled) -> when it may be asked again."""
    listed: frozenset[int] = frozenset()
    """The newest versions its last listing claimed (a claim, not a fact)."""
    lies: int = 0
    """Versions it listed and then said it does not hold."""
    quiet_until: float = float("-inf")
    """Its listings are ignored until this time (`time.monotonic`)."""
    streams: int = 0
    """Payload streams it said it was sending at its last bitfield answer (a swarm peer; at
    most `MAX_STREAMS_BELIEVED`): a new ask waits behind them. A claim, so it only orders
    holders and units (`pick`, `ShardFetcher._next_job`); the rate floor and the scores
    judge what the peer then does."""

    def lacks(self, version: int, now: float) -> bool:
        """Whether it said lately that it does not hold `version`."""
        return self.missing.get(version, float("-inf")) > now

    def excluded(self, version: int, now: float) -> bool:
        """Whether it is not to be asked for `version` now (missing or at fault lately)."""
        return self.lacks(version, now) or self.at_fault(version, now)

    def at_fault(self, version: int, now: float) -> bool:
        """Whether a transfer of `version` from it was abandoned lately as too slow."""
        return self.faulty.get(version, float("-inf")) > now

    def queue(self) -> int:
        """Streams a new ask of ours would wait behind: ours in flight, and those it last said
        it was sending (which may count ours too: a stale claim errs towards busy)."""
        return self.inflight + self.streams

    def note_listing(self, versions: list[int]) -> None:
        self.listed = frozenset(sorted(set(versions))[-MAX_LISTED:])


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

    def add(self, url: str) -> bool:
        """A source learnt of later (a peer); False if already known."""
        url = url.rstrip("/")
        if url in self.stats:
            return False
        self.stats[url] = SourceStats(url)
        return True

    def forget(self, url: str) -> None:
        """Use `url` no more (it turned out to be this member's own)."""
        self.stats.pop(url.rstrip("/"), None)

    def dropped(self, url: str, version: int) -> bool:
        """Whether `url` is no longer used for `version`: unknown, banned for bad bytes, or
        at fault for it lately. Not when it merely lacks the version: a swarm peer is often a
        moment behind, and its bitfield says when it holds something (counting a manifest's
        404 as dropped kept members from watching each other for the first second of every
        version)."""
        s = self.stats.get(url)
        return s is None or self.banned(s) or s.at_fault(version, time.monotonic())

    def banned_url(self, url: str) -> bool:
        """Whether the source at `url` is banned for bad bytes (False when unknown)."""
        s = self.stats.get(url)
        return s is not None and self.banned(s)

    def banned(self, s: SourceStats) -> bool:
        """Whether `s` sent bad bytes `ban_after` times: never used again."""
        return s.corrupt >= self.ban_after

    def usable(
        self, version: int, avoid: set[str] = frozenset(), among: set[str] | None = None
    ) -> list[SourceStats]:
        """Sources that may serve `version`: only those in `among` when given, the ones
        in `avoid` only when nothing else is left."""
        now = time.monotonic()
        live = [
            s
            for s in self.stats.values()
            if not self.banned(s)
            and not s.excluded(version, now)
            and (among is None or s.url in among)
        ]
        preferred = [s for s in live if s.url not in avoid]
        return preferred or live

    def pick(
        self, version: int, avoid: set[str] = frozenset(), among: set[str] | None = None
    ) -> SourceStats | None:
        """A source for one transfer of `version`, or None if none is left; `avoid` holds
        sources that already failed this shard (used only if nothing else is left);
        `among`, when given, the only sources that may be picked (those holding it)."""
        candidates = self.usable(version, avoid, among)
        if not candidates:
            return None
        # An untried source gets one transfer at a time until one ends: its optimistic
        # prior is a guess, and a source that never answers would otherwise draw every
        # worker (exploration included).
        candidates = [s for s in candidates if not _untried_and_busy(s)] or candidates
        for s in self.stats.values():
            s.health = min(1.0, s.health + HEAL)
        if len(candidates) > 1 and self._rng.random() < self.explore:
            return self._rng.choice(candidates)
        return max(candidates, key=lambda s: s.goodput * s.health / (1 + s.queue()))

    def pick_idle(
        self, version: int, avoid: set[str], among: set[str] | None = None
    ) -> SourceStats | None:
        """The best source with no transfer running, outside `avoid` (and inside `among`):
        for a hedged request, which must not slow down anyone's first request. Not one that
        could not be reached and never delivered a byte (`record_unreachable`): no spare."""
        idle = [
            s
            for s in self.usable(version, avoid, among)
            if s.inflight == 0 and s.url not in avoid and s.goodput > 0
        ]
        return max(idle, key=lambda s: s.goodput * s.health / (1 + s.queue()), default=None)

    def has_alternative(self, version: int, url: str) -> bool:
        """Whether a source other than `url` could still serve `version`."""
        return any(s.url != url for s in self.usable(version, {url}))

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

    def record_unreachable(self, s: SourceStats) -> None:
        """No connection could be made. A failure, and a source that never delivered a byte
        also loses the optimistic prior it was picked for: with it, a peer that had left
        outranked every measured source after each failure too (its health halved, its
        goodput stayed at the prior), drew a share of every fetch's first picks and most of
        its hedges, and cost each of them a connection attempt. It is tried again by
        exploration, and its first success measures it afresh."""
        self.record_failure(s)
        if not s.bytes:
            s.goodput = 0.0

    def record_corrupt(self, s: SourceStats) -> None:
        s.corrupt += 1
        s.health *= 0.1
        s.goodput *= 0.1

    def record_slow(self, s: SourceStats, nbytes: int, seconds: float) -> None:
        """A transfer that lost a hedged race: its speed counts, it did nothing wrong."""
        sample = nbytes / max(seconds, 1e-6)
        s.goodput = (1 - EMA_ALPHA) * s.goodput + EMA_ALPHA * sample

    def record_too_slow(self, s: SourceStats, version: int, nbytes: int, seconds: float) -> None:
        """A transfer abandoned below the minimum rate: the source is at fault for `version`."""
        self.record_partial(s, nbytes, seconds)
        s.faulty[version] = time.monotonic() + FAULTY_RECHECK_S

    def note_listing(self, url: str, versions: list[int]) -> None:
        """`url` listed `versions`. A version it said it lacked and lists now is asked of it
        at once: its relay has mirrored it since. Waiting out the "not yet" mark instead
        failed the fetch of a just-announced version whenever the node's own relay was its
        only source (no source left to ask), and the node tried again a second later. A liar
        gains nothing: listing and then lacking a version is a lie, and a muted source's
        listings clear nothing."""
        s = self.stats[url]
        s.note_listing(versions)
        if self.heard(url):
            for v in s.listed:
                s.missing.pop(v, None)

    def note_streams(self, url: str, streams: int) -> None:
        """`url` said it is sending `streams` payload streams (its bitfield answer)."""
        s = self.stats.get(url)
        if s is not None:
            s.streams = min(streams, MAX_STREAMS_BELIEVED)

    def heard(self, url: str) -> bool:
        """Whether `url`'s listing counts: not banned, not muted for a recent lie."""
        s = self.stats[url]
        return not self.banned(s) and time.monotonic() >= s.quiet_until

    def all_lack(self, version: int) -> bool:
        """Whether every source said lately that it does not hold `version`."""
        now = time.monotonic()
        return all(s.lacks(version, now) for s in self.stats.values())

    def record_missing(self, s: SourceStats, version: int) -> None:
        """`s` said it does not hold `version`; if it had listed it, that was a lie. A version
        newer than all it listed is most likely on its way to it (a relay polls its upstream
        twice a second), so it is asked again soon: waiting `MISSING_RECHECK_S` put a 5 s floor
        under every new version reaching a node, whose only source is its own relay."""
        now = time.monotonic()
        ahead = not s.listed or version > max(s.listed)
        s.missing[version] = now + (NOT_YET_RECHECK_S if ahead else MISSING_RECHECK_S)
        self._check_claim(s, version, now)

    def record_bad_manifest(self, s: SourceStats, version: int) -> None:
        self.record_corrupt(s)
        self._check_claim(s, version, time.monotonic())

    def _check_claim(self, s: SourceStats, version: int, now: float) -> None:
        """A source that listed `version` and cannot serve it lied: it is scored down and
        its listings are ignored for a while, doubling with each lie."""
        if version not in s.listed:
            return  # not listed: an honest "not yet" or "no longer"
        s.lies += 1
        self.record_failure(s)
        quiet = min(MAX_QUARANTINE, LIE_QUARANTINE * 2 ** (s.lies - 1))
        s.quiet_until = max(s.quiet_until, now + quiet)


def _untried_and_busy(s: SourceStats) -> bool:
    return bool(s.inflight) and not (s.ok or s.failed)
