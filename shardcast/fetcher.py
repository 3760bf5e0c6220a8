"""Parallel shard downloads from several sources, each shard checked as it streams.

Used by the client (into the folder a version will appear as) and by the relay (into its
store, marking each verified shard servable at once). Each shard is a byte range of one
payload file, written straight into place with `pwrite`; its BLAKE3 is updated on the same
bytes, off the event loop. A transfer that breaks resumes with `Range` from the last byte
received, on another source when there is one. A shard that fails its hash is fetched again
from a source that did not contribute to it, and every contributor is scored down and
reported. Retries per shard are bounded, with exponential backoff.

Slow is a fault too. Once a response has started, a transfer must receive `min_rate` bytes/s
over every `rate_window`; one that falls below is abandoned (its bytes kept) and resumed on
another source, and its source is not asked for that version again. The floor applies only
when another source could serve the shard: with one source, slow beats nothing. When every
remaining shard is already in flight, an idle worker hedges the oldest one on an idle source
(into a side file, so two writers never share bytes): the first verified copy wins and the
other transfer is cancelled. That also rescues a shard stuck on a source that never answers.

In a swarm (`Swarming`), sources are of two kinds: seeds (origin, relays) that hold or will
hold every unit, and peers that hold what their bitfields say. Units are taken rarest
first (fewest peers holding them; this member's share of the first copies, then random,
among equals), a unit is fetched from a peer holding it whenever there is one, and at most
`seed_parallel` transfers at once go to the seeds, whose upload is the swarm's scarce
resource: it should carry each unit once. So a unit that a peer is fetching from a seed
(its promise, in its `/have`) is left to that peer for a while and taken from it once held.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import httpx
import trio

from shardcast.errors import FetchError, ShardcastError, first_error
from shardcast.manifest import Manifest, PayloadFile, unit_range, units
from shardcast.sources import SourcePicker, SourceStats

log = logging.getLogger(__name__)

FLUSH_BYTES = 2 * 1024 * 1024
HEDGE_POLL = 0.1  # seconds between an idle worker's looks for a shard to hedge (tail only)


class VersionGone(FetchError):
    """No source holds the version any more (every one answered 404)."""


class FetchDeadline(FetchError):
    """A fetch ran past its overall deadline (`FetchPolicy.deadline`)."""


class _TransferFailed(Exception):
    """One attempt at one shard failed in a way another attempt may not."""


class _Unreachable(_TransferFailed):
    """No connection could be made: nothing listens at the source's address (a peer that
    left, a relay that is down)."""


class _TooSlow(_TransferFailed):
    """The transfer fell below the minimum rate while another source could serve it."""


class _NotNow(_TransferFailed):
    """503: the source is busy (its connection caps) or has not got the unit yet (a relay
    still mirroring). It says nothing against the source or the data, so it spends the
    unit's `busy_wait` rather than one of its attempts."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Progress:
    """A shard's bytes so far: kept across attempts so a broken transfer resumes."""

    hasher: blake3.blake3 = field(default_factory=blake3.blake3)
    got: int = 0
    segments: list[tuple[str, int]] = field(default_factory=list)
    """(source, where in the unit its bytes begin), in order: who sent which bytes."""

    @property
    def contributors(self) -> set[str]:
        return {url for url, _ in self.segments}

    def add(self, url: str, n: int) -> None:
        """`n` more bytes, from `url`."""
        if not self.segments or self.segments[-1][0] != url:
            self.segments.append((url, self.got))
        self.got += n

    def ranges(self) -> list[tuple[str, int, int]]:
        """(source, start, end) of each source's bytes within the unit."""
        ends = [start for _, start in self.segments[1:]] + [self.got]
        return [(url, start, end) for (url, start), end in zip(self.segments, ends, strict=True)]


Suspect = tuple[str, int, int, str]
"""(source, start, end, BLAKE3 of the bytes it sent there) from a unit that failed its hash."""


def _digests(path: Path, offset: int, ranges: list[tuple[str, int, int]]) -> list[Suspect]:
    """The BLAKE3 of each source's range of a unit as the file holds it now."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return [
            (url, a, b, blake3.blake3(os.pread(fd, b - a, offset + a)).hexdigest())
            for url, a, b in ranges
        ]
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ShardJob:
    """One unit of transfer: a piece, or a shard of a manifest without pieces."""

    name: str
    """Payload file name, as served under /v/{version}/f/."""
    index: int
    offset: int
    length: int
    hash: str
    path: Path
    """Local file the unit is written into, at `offset`."""


def unit_jobs(m: Manifest, p: PayloadFile, path: Path) -> list[ShardJob]:
    """A job per unit of payload file `p`, written into `path`."""
    jobs = []
    for i, h in enumerate(units(m, p)):
        off, length = unit_range(m, p, i)
        jobs.append(ShardJob(p.name, i, off, length, h, path))
    return jobs


@dataclass(eq=False)
class _Race:
    """One shard's contest between its primary transfer and at most one hedge."""

    job: ShardJob
    started: float
    sources: set[str] = field(default_factory=set)
    """Sources transferring this shard right now (a hedge goes elsewhere)."""
    hedged: bool = False
    """A hedge is in flight (a failed one clears it, so the next idle source may try)."""
    hedge_over: trio.Event = field(default_factory=trio.Event)
    winner: str | None = None
    error: ShardcastError | None = None
    nursery: trio.Nursery | None = None
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def side_path(self) -> Path:
        return self.job.path.with_name(f".{self.job.path.name}.hedge{self.job.index}")

    def win(self, who: str) -> None:
        if self.winner is None:
            self.winner = who
            assert self.nursery is not None
            self.nursery.cancel_scope.cancel()


def _never(job: ShardJob) -> bool:
    return False


def _always(job: ShardJob) -> bool:
    return True


def _ignore(job: ShardJob) -> None:
    return None


SHARE_GRACE = 5.0
"""`Swarming.share_grace`'s default (the swarm's watch judges shares at its end)."""
SEED_QUIET = 3.0
"""`Swarming.seed_quiet`'s default."""


@dataclass
class Swarming:
    holders: Callable[[ShardJob], set[str]]
    """Peers known (from their bitfields, a claim checked by the hash) to hold a unit."""
    seeds: set[str]
    """Sources that hold every unit, or wait for it (cut-through)."""
    seed_parallel: int = 2
    """Transfers at once from the seeds (retries of a unit no peer holds aside) while this
    member knows no other (see `seed_slots`)."""
    members: Callable[[], int] = lambda: 1
    """Members of the swarm this one hears from (itself included): peers that answered with
    a bitfield for the version."""
    promised: Callable[[ShardJob], bool] = _never
    """A peer said, recently, that it is fetching this unit from a seed: it is left to that
    peer (and taken from it once held) rather than copied out of a seed a second time."""
    preferred: Callable[[ShardJob], bool] = _always
    """This member's share of the first copies: taken first among units nobody has. Every
    unit is, for a member alone in the deal."""
    reserved: Callable[[ShardJob], bool] = _never
    """Another member's share that it can be seen taking (see `share_grace`)."""
    on_seed_fetch: Callable[[ShardJob], None] = _ignore
    """Called when a transfer of a unit goes to a seed (to advertise the promise)."""
    on_unit_done: Callable[[ShardJob, bool], None] = lambda job, won: None
    """Called when a unit's fetch ends, won (its bytes held) or not: a seed transfer's time
    paces how long peers' promises are waited for."""
    listen: Callable[[Callable[[], None]], None] = lambda wake: None
    """Registers a call for whenever a peer's bitfield brings news (a unit held or promised
    for the first time): a worker waiting for a unit only a peer will have starts it then,
    not at its next look (`HEDGE_POLL`), which on a small version was the longest wait."""
    share_grace: float = SHARE_GRACE
    """Seconds from the start of a fetch during which units nobody holds that are another
    member's share are left to it: several members copying the same unit out of a seed
    cost the seed's upload, while fewer streams to a capped seed lose it nothing."""
    seed_quiet: float = SEED_QUIET
    """A unit nobody this member watches holds or promised, and not its own share, is taken
    from a seed only once no unit has landed here for this long: from a peer, or its own
    share from a seed (the fetch's start counts as one). A member watches `max_peers` of its
    peers, so in a larger swarm most units are on their way to members it cannot see.
    Taking each of them from the seed as soon as a seed transfer was free had the origin
    send a 32-member swarm's version 3 times over (1.0 with this wait, docs/shardcast.md).
    While units keep landing, the ones it cannot see yet reach its watched peers soon
    enough. Only verified units count, so a peer cannot hold this member off the seeds with
    claims, only by serving it the version. A member alone in the deal owns every unit, so
    it never waits."""

    def seed_slots(self) -> int:
        """Seed transfers this member keeps in flight: `seed_parallel` alone, one in a swarm.
        A seed's upload is shared by every transfer in flight, so with N members taking k
        each, N x k units are under way at once and all land near the end of the seed's
        work, each one still to be spread to every member by their uploads. One each halves
        that tail (docs/shardcast.md: 1.38x the swarm bound with k = 2, 1.26x with k = 1 in
        the quick benchmark). Alone, a member has no peers' uploads to wait on, and a second
        transfer hides a request's round trip."""
        return self.seed_parallel if self.members() <= 1 else 1


@dataclass
class FetchPolicy:
    parallel: int = 8
    max_attempts: int = 8
    backoff: float = 0.05
    max_backoff: float = 2.0
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    """Longest silence on one transfer; must exceed a relay's cut-through wait."""
    min_rate: float = 64 * 1024
    """Bytes/s a started transfer must keep up over every `rate_window` while another
    source could serve the shard; 0 turns the floor off."""
    rate_window: float = 5.0
    sole_holder_window: float = 25.0
    """`rate_window` for a transfer in a swarm from the only peer known to hold the unit, when
    a seed is the only other source, if that peer has served this member more units than it
    failed. A unit that has just landed at one member is every member's rarest: they all ask
    that member at once, and its upload cap serves them oldest first, so the last in line
    waits for the others' copies before its first byte. Cut after `rate_window`, each went
    to the seed instead and held that member at fault for `FAULTY_RECHECK_S`: at N = 32 and
    1 MB/s most of the origin's extra copies (docs/shardcast.md). Longer than the cap's
    `STARVED_S`, within which it serves every waiting stream, so an honest member's queue
    is not taken for a stall. Earned by serving, so a peer that claims units and stalls
    holds a worker that long only after paying a unit's upload for each time (a cut costs
    it a failure and `FAULTY_RECHECK_S` unused); for at most half of this member's
    transfers at once, so stalling peers never hold all its workers; and a second holder of
    the unit still takes the transfer over as a hedge."""
    first_byte_timeout: float = 15.0
    """Longest wait for a response's headers while another source could serve the shard
    (an honest relay waits for a shard it is still mirroring; a far-behind one is slow)."""
    hedge_after: float = 1.0
    """Seconds a shard must have been in flight before an idle worker may hedge it."""
    deadline: float = 3600.0
    """Overall limit on one fetch (a version and its delta chain), in seconds."""
    busy_wait: float = 60.0
    """Seconds one unit may wait on 503 answers (busy, or not held yet), each wait what the
    source's Retry-After asks (at most `MAX_RETRY_AFTER_S`), before they count as failed
    attempts, plus the time the unit takes at `min_rate` (`busy_wait_for`). With every
    answer a failure, 32 clients behind one address (sharing a relay's per-address cap) gave
    up within seconds of a relay that was merely busy."""

    def busy_wait_for(self, unit_bytes: int) -> float:
        """`busy_wait` for a version whose units are `unit_bytes`: a busy source is busy for
        as long as its transfers take, so every unit of a version of larger units waits
        longer, small ones included. With a flat 60 s, 32 tree clients behind one address
        gave up on 8 MiB pieces, and on a config file, while the relay was busy sending 8 MiB
        pieces to the others (sixteenth session, when large versions got larger pieces)."""
        return self.busy_wait + (unit_bytes / self.min_rate if self.min_rate > 0 else 0.0)


MAX_RETRY_AFTER_S = 5.0
"""The longest Retry-After a fetch obeys (a hostile source could ask for hours)."""
BUSY_QUEUE = 4
"""A peer sending this many streams (by its last bitfield answer, with ours) is busy: a
unit only busy peers hold is taken after every unit that a less busy peer or a seed could
start. Rarest first alone piled the members' workers into the queues of a few peers (those
holding the units that had just landed), 10-20 deep under an upload cap that serves the
oldest stream first, while 2-11 of 33 uploaders sent nothing (docs/shardcast.md,
thirty-ninth session). Four streams at 1 MB/s and 256 KiB pieces are a second's wait."""


def retry_after_s(r: httpx.Response) -> float:
    """The response's Retry-After in seconds (a number; a date or junk reads as 1 s), within
    (0, MAX_RETRY_AFTER_S]."""
    try:
        asked = float(r.headers.get("retry-after", "1"))
    except ValueError:
        asked = 1.0
    return min(max(asked, 0.05), MAX_RETRY_AFTER_S) if math.isfinite(asked) else 1.0


def prepare_file(path: Path, size: int) -> None:
    """Create `path` with its final size, reserving the blocks so a full disk fails now,
    with a clear error, rather than halfway through the download."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if size:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(fd, size)
        else:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def disk_error(e: OSError, path: Path) -> FetchError:
    full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    what = "the disk is full (or the file size limit reached)" if full else e.strerror
    return FetchError(f"cannot write {path}: {what} ({errno.errorcode.get(e.errno, e.errno)})")


class ResponseTooLarge(Exception):
    """A peer sent more bytes than the message it was asked for may have."""


async def get_capped(
    http: httpx.AsyncClient,
    url: str,
    cap: int,
    params: dict | None = None,
    headers: dict | None = None,
) -> tuple[int, bytes]:
    """GET `url`: (status, body), reading at most `cap` bytes, so an untrusted peer cannot
    make us buffer an endless body."""
    async with http.stream("GET", url, params=params, headers=headers) as r:
        body = bytearray()
        async for chunk in r.aiter_raw():
            body += chunk
            if len(body) > cap:
                raise ResponseTooLarge(f"{url}: response exceeds {cap} bytes")
        return r.status_code, bytes(body)


def _sink(fd: int, chunks: list[bytes], pos: int, hasher: blake3.blake3) -> None:
    """Hash and write received chunks as they are (no joining copy)."""
    for c in chunks:
        hasher.update(c)
    views = [memoryview(c) for c in chunks]
    while views:
        n = os.pwritev(fd, views, pos)
        pos += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _copy_range(side: Path, job: ShardJob) -> None:
    """Copy a hedge's verified bytes from its side file into the shard's place."""
    src = os.open(side, os.O_RDONLY)
    dst = os.open(job.path, os.O_WRONLY)
    try:
        pos, end = job.offset, job.offset + job.length
        while pos < end:
            data = os.pread(src, min(FLUSH_BYTES, end - pos), pos)
            if not data:
                raise OSError(errno.EIO, f"{side} ended early")
            os.pwrite(dst, data, pos)
            pos += len(data)
    finally:
        os.close(src)
        os.close(dst)


def _unlink_quietly(path: Path) -> None:
    path.unlink(missing_ok=True)


def http_client(
    policy: FetchPolicy,
    mounts: dict[str, httpx.AsyncBaseTransport] | None = None,
    source_address: str | None = None,
) -> httpx.AsyncClient:
    """The fetch path's HTTP client; `mounts` adds transports for other URL schemes (a
    `p2p://` source: `shardcast.p2p.P2PTransport`). `source_address` is the local address
    its connections come from (default: the system's choice)."""
    timeout = httpx.Timeout(
        connect=policy.connect_timeout, read=policy.read_timeout, write=10.0, pool=None
    )
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    transport = (
        httpx.AsyncHTTPTransport(limits=limits, local_address=source_address)
        if source_address
        else None
    )
    return httpx.AsyncClient(
        timeout=timeout,
        limits=limits,
        transport=transport,
        follow_redirects=False,
        mounts=mounts,
    )


class ShardFetcher:
    def __init__(
        self,
        http: httpx.AsyncClient,
        picker: SourcePicker,
        policy: FetchPolicy,
        on_corrupt: Callable[[str, int, ShardJob], None] | None = None,
        swarm: Swarming | None = None,
    ) -> None:
        self.http = http
        self.picker = picker
        self.policy = policy
        self.on_corrupt = on_corrupt
        self.swarm = swarm
        self._wake = trio.Event()
        # Units taken because no peer held them (bound for a seed), until their race ends:
        # counted at the pick, since workers pick before any transfer has started.
        self._for_seeds: set[ShardJob] = set()
        self._started = float("-inf")  # trio time the current fetch began
        self._landed = float("-inf")  # trio time a unit last landed (or the fetch began)
        self._busy_budget = policy.busy_wait
        """Seconds each unit of the current fetch may wait on busy sources (`fetch`)."""
        self._patient = 0
        """Transfers in flight judged over `sole_holder_window`."""

    async def fetch(
        self,
        version: int,
        jobs: list[ShardJob],
        on_done: Callable[[ShardJob], None] | None = None,
        *,
        unit_bytes: int | None = None,
    ) -> None:
        """Fetch every job; raises VersionGone or FetchError (and cancels the rest) on the
        first shard that cannot be had. `unit_bytes` is the version's unit (`Manifest.unit`,
        default: the largest job), what its sources are busy sending to others: every unit,
        however small, may wait on busy sources for `policy.busy_wait_for` that size."""
        self._busy_budget = self.policy.busy_wait_for(
            unit_bytes or max((j.length for j in jobs), default=0)
        )
        queue = deque(jobs)
        races: dict[ShardJob, _Race] = {}
        self._started = self._landed = trio.current_time()
        if self.swarm is not None:
            self.swarm.listen(self._wake_workers)

        async def worker() -> None:
            while queue or races:
                job = self._next_job(queue) if queue else None
                if job is not None:
                    await self._race(version, job, races)
                    if on_done is not None:
                        on_done(job)
                    continue
                race = None if queue else self._hedgeable(races)
                if race is None or not await self._hedge(version, race):
                    # Wake when a shard ends (maybe the last) or a peer has news, or to look
                    # for hedges again.
                    with trio.move_on_after(HEDGE_POLL):
                        await self._wake.wait()

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(self.policy.parallel, len(jobs))):
                    nursery.start_soon(worker)
        except BaseExceptionGroup as group:
            raise first_error(group) from None

    def _wake_workers(self) -> None:
        """Let idle workers look again for a unit to start or hedge."""
        self._wake.set()
        self._wake = trio.Event()

    def _next_job(self, queue: deque[ShardJob]) -> ShardJob | None:
        """The next shard to fetch: in order, or in a swarm the rarest one that can start
        now (None: wait for a seed slot or for a peer to get something), among units that
        some holder could start soon if there are any (`BUSY_QUEUE`)."""
        if self.swarm is None:
            return queue.popleft()
        now = trio.current_time()
        seeds_busy = len(self._for_seeds) >= self.swarm.seed_slots()
        in_grace = now - self._started < self.swarm.share_grace
        landing = now - self._landed < self.swarm.seed_quiet
        best: tuple[bool, int, bool, float] | None = None
        chosen, chosen_holders = None, 0
        for job in queue:
            holders = self.swarm.holders(job)
            n = len(holders)
            if n == 0 and (
                seeds_busy
                or self.swarm.promised(job)
                or (in_grace and self.swarm.reserved(job))
                or (landing and not self.swarm.preferred(job))
            ):
                continue
            busy = n > 0 and all(self._queue_at(url) >= BUSY_QUEUE for url in holders)
            key = (busy, n, not self.swarm.preferred(job), random.random())
            if best is None or key < best:
                best, chosen, chosen_holders = key, job, n
        if chosen is not None:
            queue.remove(chosen)
            if chosen_holders == 0:
                self._for_seeds.add(chosen)
        return chosen

    def _queue_at(self, url: str) -> int:
        """Streams an ask of ours to the peer at `url` would wait behind (an unknown URL is
        taken for a busy one)."""
        s = self.picker.stats.get(url)
        return BUSY_QUEUE if s is None else s.queue()

    def _ended(self, job: ShardJob, won: bool) -> None:
        """A unit's race is over: its seed slot is free, and a unit landed from a peer, or
        this member's own share from a seed, counts as units landing (`seed_quiet`). Other
        units from a seed do not, or each one would hold the next off the seed."""
        for_seeds = job in self._for_seeds
        self._for_seeds.discard(job)
        if self.swarm is None:
            return
        if won and (not for_seeds or self.swarm.preferred(job)):
            self._landed = trio.current_time()
        self.swarm.on_unit_done(job, won)

    def _pick_source(self, version: int, job: ShardJob, avoid: set[str]) -> SourceStats | None:
        if self.swarm is not None:
            peers = self.swarm.holders(job) - avoid
            source = self.picker.pick(version, avoid, among=peers) if peers else None
            return source or self.picker.pick(version, avoid, among=self.swarm.seeds)
        return self.picker.pick(version, avoid)

    async def _race(self, version: int, job: ShardJob, races: dict[ShardJob, _Race]) -> None:
        """Fetch one shard in place, letting `_hedge` add a second contestant; the first
        verified copy wins and cancels the other."""
        race = _Race(job, trio.current_time())
        races[job] = race
        try:
            async with trio.open_nursery() as nursery:
                race.nursery = nursery
                nursery.start_soon(self._primary, version, race)
            if race.winner == "hedge":
                # The loser has stopped writing (its cancellation waited for its last write).
                await trio.to_thread.run_sync(_copy_range, race.side_path, job)
        except OSError as e:
            raise disk_error(e, job.path) from None
        finally:
            del races[job]
            self._ended(job, won=race.winner is not None)
            race.done.set()
            self._wake_workers()
            if race.hedged:
                await trio.to_thread.run_sync(_unlink_quietly, race.side_path)
        if race.winner is None:
            raise race.error or FetchError(f"v{version} {job.name}: shard {job.index} lost")

    async def _primary(self, version: int, race: _Race) -> None:
        try:
            await self._fetch_one(version, race.job, race)
        except ShardcastError as e:
            race.error = e  # the hedge, if any, may still win
            return
        race.win("primary")

    def _hedgeable(self, races: dict[ShardJob, _Race]) -> _Race | None:
        """The oldest shard in flight long enough and not hedged yet."""
        now = trio.current_time()
        old = [
            r
            for r in races.values()
            if not r.hedged and r.winner is None and now - r.started >= self.policy.hedge_after
        ]
        return min(old, key=lambda r: r.started, default=None)

    async def _hedge(self, version: int, race: _Race) -> bool:
        """One extra request for `race`'s shard on an idle source, into a side file; holds
        this worker until the race ends, so hedges never exceed `parallel` transfers.
        False when no source is idle now (try again later)."""
        among = None
        if self.swarm is not None:
            # A hedge on a seed is a second copy out of the swarm's scarcest upload: only
            # for a unit no peer holds.
            among = self.swarm.holders(race.job) or self.swarm.seeds
        source = self.picker.pick_idle(version, race.sources, among)
        if source is None:
            return False
        race.hedged = True  # one hedge per shard
        try:
            await trio.to_thread.run_sync(prepare_file, race.side_path, 0)
        except OSError as e:
            raise disk_error(e, race.side_path) from None
        if race.winner is not None or race.done.is_set():  # decided while the file was made
            await trio.to_thread.run_sync(_unlink_quietly, race.side_path)
            return True
        side = ShardJob(**{**race.job.__dict__, "path": race.side_path})
        assert race.nursery is not None
        race.hedge_over = trio.Event()
        race.nursery.start_soon(self._hedge_transfer, version, side, source, race)
        # The worker is held while its hedge is in flight (hedges never exceed `parallel`
        # transfers), and freed when the hedge won, lost, failed or was cancelled with its race.
        await race.hedge_over.wait()
        return True

    async def _hedge_transfer(
        self, version: int, side: ShardJob, source: SourceStats, race: _Race
    ) -> None:
        try:
            await self._hedge_attempt(version, side, source, race)
        finally:
            race.hedge_over.set()

    async def _hedge_attempt(
        self, version: int, side: ShardJob, source: SourceStats, race: _Race
    ) -> None:
        log.info("v%d %s shard %d: hedging on %s", version, side.name, side.index, source.url)
        fd = os.open(side.path, os.O_WRONLY)
        try:
            if await self._attempt(version, side, fd, source, _Progress(), race):
                race.win("hedge")
            else:
                race.hedged = False  # bad bytes: another source may hedge
        except (ShardcastError, _TransferFailed) as e:
            # A hedge is a spare: its failure is scored against its source and ends here; the
            # primary carries on, and another idle source may hedge it.
            log.info("v%d %s shard %d: hedge failed: %s", version, side.name, side.index, e)
            race.hedged = False
        finally:
            os.close(fd)

    async def _fetch_one(self, version: int, job: ShardJob, race: _Race) -> None:
        try:
            fd = os.open(job.path, os.O_WRONLY)
        except OSError as e:
            raise disk_error(e, job.path) from None
        try:
            await self._fetch_into(version, job, fd, race)
        finally:
            os.close(fd)

    async def _fetch_into(self, version: int, job: ShardJob, fd: int, race: _Race) -> None:
        prog = _Progress()
        avoid: set[str] = set()
        suspects: list[Suspect] = []  # a mixed unit's sources: judged once the unit verifies
        attempts = busy = 0
        waited = 0.0
        last_error = "no attempt"
        while True:
            if attempts >= self.policy.max_attempts:
                raise FetchError(
                    f"v{version} {job.name} shard {job.index}: gave up after {attempts} "
                    f"attempts; last error: {last_error}"
                )
            source = self._pick_source(version, job, avoid)
            if source is None:
                if self.picker.all_lack(version):
                    raise VersionGone(f"no source holds version {version} any more")
                raise FetchError(f"v{version} {job.name}: every source is banned or at fault")
            attempts += 1
            if self.swarm is not None and source.url in self.swarm.seeds:
                self.swarm.on_seed_fetch(job)
            try:
                if await self._attempt(version, job, fd, source, prog, race):
                    if suspects:
                        await self._judge(version, job, suspects)
                    return
                last_error = f"hash mismatch from {sorted(prog.contributors)}"
                if len(prog.contributors) == 1:
                    avoid |= prog.contributors
                else:
                    suspects += await trio.to_thread.run_sync(
                        _digests, job.path, job.offset, prog.ranges()
                    )
                prog = _Progress()
            except _TransferFailed as e:
                last_error = f"{source.url}: {e}"
                log.info("v%d %s shard %d: %s", version, job.name, job.index, last_error)
                avoid.add(source.url)  # another source first, if there is one
                if isinstance(e, _NotNow) and waited < self._busy_budget:
                    attempts -= 1  # busy, or not held yet: no attempt spent
                    busy += 1
                    # another source may serve now; else wait as long as this one asked
                    alone = not self.picker.has_alternative(version, source.url)
                    delay = e.retry_after if alone else self._backoff(busy)
                    delay = min(delay, self._busy_budget - waited)
                    waited += delay
                else:
                    delay = self._backoff(attempts)
                await trio.sleep(delay * random.uniform(0.5, 1.0))

    def _backoff(self, failures: int) -> float:
        """The pause after a unit's `failures`-th failure, before jitter: doubling, capped."""
        return min(self.policy.max_backoff, self.policy.backoff * 2 ** (failures - 1))

    async def _attempt(
        self,
        version: int,
        job: ShardJob,
        fd: int,
        source: SourceStats,
        prog: _Progress,
        race: _Race,
    ) -> bool:
        """One request to `source` for the rest of the shard, scored: True when the shard is
        complete and verified, False when it failed its hash (`prog` must then restart);
        raises _TransferFailed when the transfer broke or was too slow."""
        source.inflight += 1
        race.sources.add(source.url)
        start = trio.current_time()
        before = prog.got
        try:
            await self._transfer(version, job, fd, source, prog)
        except _TooSlow:
            self.picker.record_too_slow(
                source, version, prog.got - before, trio.current_time() - start
            )
            raise
        except _Unreachable:
            self.picker.record_unreachable(source)
            raise
        except _TransferFailed:
            self.picker.record_partial(source, prog.got - before, trio.current_time() - start)
            raise
        except trio.Cancelled:
            # Lost a hedged race (or the whole fetch ended): its speed so far still counts.
            self.picker.record_slow(source, prog.got - before, trio.current_time() - start)
            raise
        finally:
            source.inflight -= 1
            race.sources.discard(source.url)
        if prog.hasher.hexdigest() == job.hash:
            took = trio.current_time() - start
            self.picker.record_success(source, prog.got - before, took)
            log.debug(
                "v%d %s unit %d: %d bytes from %s in %.3f s",
                version, job.name, job.index, prog.got - before, source.url, took,
            )  # fmt: skip
            return True
        self._blame(version, job, prog)
        return False

    def _blame(self, version: int, job: ShardJob, prog: _Progress) -> None:
        # Bytes from several sources (a resumed transfer): which one lied is unknown yet, and
        # blaming all would let a liar frame an honest source. The unit is fetched again
        # whole, and once it verifies, each source's bytes are compared with it (`_judge`).
        if len(prog.contributors) == 1:
            (url,) = prog.contributors
            self._corrupt(version, job, url)

    async def _judge(self, version: int, job: ShardJob, suspects: list[Suspect]) -> None:
        """With the unit verified on disk, name the sources among `suspects` whose bytes
        differ from it. Failures alone never caught a peer that sent one wrong byte and cut
        the body: each mixed unit cost both sources a failure, the origin resent the unit,
        and the liar was asked again for the next."""
        ranges = [(url, a, b) for url, a, b, _ in suspects]
        now = await trio.to_thread.run_sync(_digests, job.path, job.offset, ranges)
        for (url, *_, sent), (*_, held) in zip(suspects, now, strict=True):
            if sent != held and url in self.picker.stats:
                self._corrupt(version, job, url)

    def _corrupt(self, version: int, job: ShardJob, url: str) -> None:
        self.picker.record_corrupt(self.picker.stats[url])
        log.warning("v%d %s shard %d: bad bytes from %s", version, job.name, job.index, url)
        if self.on_corrupt is not None:
            self.on_corrupt(url, version, job)

    async def _transfer(
        self,
        version: int,
        job: ShardJob,
        fd: int,
        source: SourceStats,
        prog: _Progress,
    ) -> None:
        """One HTTP request for the rest of the shard, advancing `prog`."""
        first = job.offset + prog.got
        last = job.offset + job.length - 1
        url = f"{source.url}/v/{version}/f/{job.name}"
        chunks: list[bytes] = []
        pending = 0

        async def flush() -> None:
            nonlocal chunks, pending
            if not chunks:
                return
            batch, n = chunks, pending
            chunks, pending = [], 0
            try:
                await trio.to_thread.run_sync(_sink, fd, batch, job.offset + prog.got, prog.hasher)
            except OSError as e:
                raise disk_error(e, job.path) from None
            prog.add(source.url, n)

        window = self._floor_window(version, job, source)
        floor = _RateFloor(self.policy, window)
        patient = int(window == self.policy.sole_holder_window)
        self._patient += patient
        try:
            with floor.scope:
                headers = {"Range": f"bytes={first}-{last}"}
                async with self.http.stream("GET", url, headers=headers) as r:
                    self._check_response(r, version, source, first, last)
                    floor.start()
                    async for chunk in r.aiter_raw():
                        if prog.got + pending + len(chunk) > job.length:
                            raise _TransferFailed("more bytes than the range asked for")
                        floor.add(len(chunk))
                        chunks.append(chunk)
                        pending += len(chunk)
                        if pending >= FLUSH_BYTES:
                            await flush()
                    await flush()
        except httpx.ConnectError as e:
            raise _Unreachable(f"{type(e).__name__}: {e}") from None
        except (httpx.HTTPError, httpx.StreamError) as e:
            await flush()
            raise _TransferFailed(f"{type(e).__name__}: {e}") from None
        finally:
            self._patient -= patient
        if floor.scope.cancelled_caught and not floor.body:
            raise _TransferFailed(f"no answer in {self.policy.first_byte_timeout:.1f}s")
        if floor.scope.cancelled_caught:
            await flush()  # what did arrive is good to resume from
            raise _TooSlow(f"below {self.policy.min_rate:.0f} B/s for {floor.window:.1f}s")
        if prog.got < job.length:
            raise _TransferFailed(f"body ended after {prog.got} of {job.length} bytes")

    def _floor_window(self, version: int, job: ShardJob, source: SourceStats) -> float | None:
        """The rate floor's window for a transfer of `job` from `source`, or None for no
        floor: when no other source could serve `job` now. In a swarm another source is a
        peer holding the unit, or another seed: a peer without it is none. Counting every
        peer let the rate floor cut a seed that was merely sharing its upload fairly (16
        members at 1 MB/s get 62 KB/s each, under the 64 KiB/s floor): the seed was then at
        fault, every member gave the version up as having no source, and a 16 MiB version
        took minutes (thirty-first session). A peer that only a seed could replace, and that
        has served this member more units than it failed, gets `sole_holder_window`, while
        fewer than half of this member's transfers have it."""
        url = source.url
        if self.swarm is None:
            alive = self.picker.has_alternative(version, url)
            return self.policy.rate_window if alive else None
        peers = self.swarm.holders(job) - {url}
        if self.picker.usable(version, among=peers):
            return self.policy.rate_window
        if not self.picker.usable(version, among=self.swarm.seeds - {url}):
            return None
        earned = url not in self.swarm.seeds and source.ok > source.failed
        room = self._patient < max(1, self.policy.parallel // 2)
        return self.policy.sole_holder_window if earned and room else self.policy.rate_window

    def _check_response(
        self, r: httpx.Response, version: int, source: SourceStats, first: int, last: int
    ) -> None:
        if r.status_code == 404:
            self.picker.record_missing(source, version)
            raise _TransferFailed("404: version not held")
        if r.status_code == 503:
            raise _NotNow("503: busy or not held yet", retry_after_s(r))
        if r.status_code != 206:
            raise _TransferFailed(f"HTTP {r.status_code}")
        expect = f"bytes {first}-{last}/"
        if not r.headers.get("content-range", "").startswith(expect):
            raise _TransferFailed(f"wrong Content-Range {r.headers.get('content-range')}")


class _RateFloor:
    """Cancels a transfer whose headers take over `first_byte_timeout`, or whose body
    brings fewer than `min_rate * window` bytes within a window (each window starts when the
    previous one's quota was met). Inactive (`window` None) when no other source could serve."""

    def __init__(self, policy: FetchPolicy, window: float | None) -> None:
        self.window = window or 0.0
        self.quota = policy.min_rate * self.window
        self.active = window is not None
        self.body = False
        self.scope = trio.CancelScope()
        if self.active:
            self.scope.deadline = trio.current_time() + policy.first_byte_timeout
        self._got = 0

    def start(self) -> None:
        """The body begins (or a window's quota was met): a new window."""
        self.body = True
        self.scope.deadline = float("inf")
        if self.active and self.quota > 0:
            self._got = 0
            self.scope.deadline = trio.current_time() + self.window

    def add(self, n: int) -> None:
        self._got += n
        if self._got >= self.quota:
            self.start()
