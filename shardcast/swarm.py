"""A relay's view of its peers: gossip of who serves, and which shards each one holds.

A swarm member is a `Relay` given an identity (see relay.py): it mirrors each version from
its upstreams (seeds: the origin, relays) *and* from its peers (other members), and serves
what it holds. `PeerWatch` keeps that going:

- **Gossip** (`run`): every `GOSSIP_EVERY` seconds it pushes this member's signed
  announcement to its upstreams and a few peers (`POST /peers`) and pulls theirs
  (`GET /peers`); every announcement that checks out makes its URL a source. A late joiner
  therefore learns the swarm from its first pull of the origin.
- **Bitfields** (`watch`): while a version is mirrored, one long-poll per active peer on
  `GET /v/{N}/have` tells which units (pieces, or shards) that peer holds, which it is
  fetching from a seed, and how many streams it is sending; the fetcher takes the rarest
  first among units some holder is not busy with (`BUSY_QUEUE`), asks the holder with the
  shortest queue, and leaves a unit a peer is fetching from a seed to that peer for a while
  (`promise_wait`). At most `max_peers` peers are watched at once (those not dropped by
  the picker for bad bytes, stalls or lies), so the cost per member stays bounded however
  large the swarm.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import httpx
import numpy as np
import trio

from protocol.identity import Identity
from shardcast.answers import HAVE, PEERS, decode
from shardcast.errors import BadAnswer
from shardcast.fetcher import SHARE_GRACE, ResponseTooLarge, ShardJob, Swarming, get_capped
from shardcast.manifest import Manifest, shard_index, units
from shardcast.peerlist import MAX_PEER_LIST_BYTES, PeerListError, PeerListHolder
from shardcast.peers import PeerTable, announce, announceable
from shardcast.scope import may_follow, pool_scope
from shardcast.sources import SourcePicker

log = logging.getLogger(__name__)

GOSSIP_EVERY = 2.0
GOSSIP_FANOUT = 3  # peers pushed to and pulled from per round, besides the upstreams
HAVE_WAIT = 10.0  # long-poll of a peer's bitfield
HAVE_MAX_GAP = 0.5  # seconds between two polls of one peer's bitfield, with nothing held yet
HAVE_MIN_GAP = 0.05  # ... and near the end: a peer answering at once costs 20 requests/s
SMALL_VERSION = 16  # units in a version small enough to poll again at once after news
WATCH_REFRESH = 1.0  # how often the set of watched peers is revisited
MAX_PEERS_BYTES = 256 * 1024
MAX_HAVE_BYTES = 1024 * 1024
REQUEST_TIMEOUT = 10.0
PROMISE_WAIT = 5.0  # seconds a peer's "fetching it from a seed" keeps others off the seeds
PROMISE_PACE = 2.0
"""... or this many times the longest this member's own seed transfer of a unit has taken in
the version (done or still going), if longer: a seed shared by many members serves each unit
slowly to everyone, and a promise held to a fixed 5 s then lapsed for every honest member at
once (`promise_wait`)."""
PROMISE_WAIT_MAX = 60.0  # ... but never longer than this
MAX_WANT_UNITS = 16_384
"""Largest version whose missing units a member names in its `/have` polls (`want`, 2 hex
digits per 8 units: 4 KiB here). A larger version's bitfield would not fit a libp2p stream's
8 KiB request head (`StreamLimits.head_bytes`), so its polls go without `want`, answered on any
change as before."""
UNREACHABLE_RETRY_S = 30.0  # a peer whose bitfield request failed is watched again after this


class OwnUrls:
    """Every URL this member is reached at, and the one it announces.

    A node served over libp2p is known to the pool as `p2p://peer/<id>` (the coordinator's
    signed list) while its seeder listens on HTTP. A watch that knew only its HTTP URL counted
    the other as a peer: it watched and fetched from itself through the relay hop, taking the
    hop's rate and its own gateway's streams from the peers that needed them, and gossiped an
    HTTP URL nobody could reach. The node shares one with every seeder it starts, so a
    restarted seeder keeps what the node said."""

    def __init__(self) -> None:
        self._urls: set[str] = set()
        self.announced: str | None = None
        """The URL gossiped, and under which shares are dealt: the one the pool knows."""

    def add(self, url: str) -> None:
        self._urls.add(url.rstrip("/"))

    def announce(self, url: str) -> None:
        """Gossip `url`, and be dealt shares under it, from now on."""
        self.add(url)
        self.announced = url.rstrip("/")

    def __contains__(self, url: str) -> bool:
        return url.rstrip("/") in self._urls


class PeerWatch:
    def __init__(
        self,
        http: httpx.AsyncClient,
        table: PeerTable,
        picker: SourcePicker,
        upstreams: list[str],
        identity: Identity,
        max_peers: int = 8,
        peer_list: PeerListHolder | None = None,
        own: OwnUrls | None = None,
    ) -> None:
        self.http = http
        self.table = table
        self.picker = picker
        self.upstreams = upstreams
        self.identity = identity
        self.max_peers = max_peers
        self.peer_list = peer_list
        self.own = own or OwnUrls()
        self.scope = pool_scope(upstreams)
        """How far the pool's sources reach: gossiped URLs nearer than that are not followed
        (`shardcast.scope`)."""
        # version -> peer url -> set of global unit indices it holds (its latest bitfield;
        # empty for a peer that answered "not mirroring it yet"): the peers heard from
        self._have: dict[int, dict[str, set[int]]] = {}
        # version -> global unit index -> (trio time, peer url) of the first claim that a
        # peer is fetching it from a seed
        self._promised: dict[int, dict[int, tuple[float, str]]] = {}
        # version -> peer url -> units it ever claimed to hold or to be fetching
        self._claims: dict[int, dict[str, set[int]]] = {}
        # version -> unit index -> (trio time) this member's own seed transfer of it began
        self._seeding: dict[int, dict[int, float]] = {}
        # version -> the longest this member's own seed transfer of a unit took
        self._seed_unit_s: dict[int, float] = {}
        # version -> the peers whose bitfields are followed (url -> its task's scope)
        self._watched: dict[int, dict[str, trio.CancelScope]] = {}
        # version -> calls made when a peer's answer brings news (the fetcher's wake-up)
        self._listeners: dict[int, list[Callable[[], None]]] = {}
        self._members: list[str] = [""]
        """Who units are dealt to (sorted URLs, this member's own among them)."""
        self._unreachable: dict[str, float] = {}
        """Peers whose last bitfield request failed -> when (trio time): dealt no share until
        one answers, and not watched for `UNREACHABLE_RETRY_S`."""
        self._shirkers: set[str] = set()
        """Peers that let their share of a version wait out the grace untouched
        (`judge_shares`), or a promise lapse (`promised`): dealt no share and waited for no
        more."""

    @property
    def own_url(self) -> str | None:
        """The URL this member announces (None before `run`)."""
        return self.own.announced

    @own_url.setter
    def own_url(self, url: str) -> None:
        self.own.announce(url)

    def peers(self) -> list[str]:
        """Members heard of: by their own announcements (at addresses no nearer than the
        pool's sources), or in the coordinator's list; none of this member's own URLs."""
        vouched = self.peer_list.urls() if self.peer_list is not None else []
        gossiped = [u for u in self.table.urls() if may_follow(u, self.scope)]
        urls = dict.fromkeys([*vouched, *gossiped])
        return [u for u in urls if u not in self.own and u not in self.upstreams]

    # -- gossip ------------------------------------------------------------------------------

    async def run(self, own_url: str) -> None:
        """Announce `own_url` (unless the node already said which of its URLs to announce)
        and learn peers, until cancelled."""
        self.own.add(own_url)
        if self.own.announced is None:
            self.own.announce(own_url)
        while True:
            targets = self.upstreams + random.sample(
                self.peers(), min(GOSSIP_FANOUT, len(self.peers()))
            )
            own = self.own.announced or own_url
            # a URL no table accepts is not pushed: the pool's signed list carries it
            mine = announce(self.identity, self.table.pool_id, own) if announceable(own) else None
            async with trio.open_nursery() as nursery:
                for url in targets:
                    nursery.start_soon(self._exchange, url, mine)
                if self.peer_list is not None:
                    for url in self.upstreams:
                        nursery.start_soon(self._pull_peer_list, url)
            self.learn()
            await trio.sleep(GOSSIP_EVERY * random.uniform(0.8, 1.2))

    def learn(self) -> None:
        """Make every member heard of a source. Members are heard of three ways: pulled from
        a peer, pushed to our own server (`POST /peers` keeps it in the table and nothing
        else), or in the coordinator's list. Taking sources only from pulls lost the pushed
        ones for good: a member that pushes to us every round has its announcement in our
        table before any pull brings it, so no pull ever showed it as new, and a swarm of
        two never traded a unit (the second member waited out `share_grace` and took its
        peer's share from the seed)."""
        for url in self.peers():
            if self.picker.add(url):
                log.info("learnt peer %s", url)
        for url in [u for u in self.picker.stats if u in self.own and u not in self.upstreams]:
            self.picker.forget(url)  # learnt before it was known to be ours

    async def _exchange(self, url: str, mine: bytes | None) -> None:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                if mine is not None:
                    await self.http.post(f"{url}/peers", content=mine)
                status, body = await get_capped(self.http, f"{url}/peers", MAX_PEERS_BYTES)
            if status != 200:
                return
            items = decode(PEERS, body).peers
        except (httpx.HTTPError, trio.TooSlowError, BadAnswer, ResponseTooLarge):
            return  # a peer that cannot gossip is simply not heard
        for item in items[:64]:
            self.table.add(bytes(item))

    async def _pull_peer_list(self, url: str) -> None:
        """Take `url`'s copy of the coordinator's signed list if it is newer than ours: its
        members become sources (and we re-serve the list)."""
        assert self.peer_list is not None
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                status, body = await get_capped(self.http, f"{url}/peerlist", MAX_PEER_LIST_BYTES)
            if status != 200 or body == self.peer_list.raw:
                return
            self.peer_list.offer(body)
        except (httpx.HTTPError, trio.TooSlowError, ResponseTooLarge, PeerListError):
            return  # no list, an old one, or a forged one: ours stays as it was

    # -- bitfields ---------------------------------------------------------------------------

    def holders(self, version: int, index: int) -> set[str]:
        have = self._have.get(version, {})
        return {u for u, held in have.items() if index in held}

    def promised(self, version: int, index: int) -> bool:
        """Whether a peer said, less than `PROMISE_WAIT` s ago, that it is fetching the unit
        from a seed. Only the first claim per unit counts, and a peer that lets a promise
        lapse without holding the unit is believed no more (in this version or later ones),
        so a peer that claims everything and delivers nothing delays this member once, by
        `PROMISE_WAIT`, not in every version."""
        claim = self._promised.get(version, {}).get(index)
        if claim is None:
            return False
        since, url = claim
        if trio.current_time() - since < self.promise_wait(version):
            return url not in self._shirkers
        if index not in self._have.get(version, {}).get(url, set()):
            self._shirk([url], "let a promise lapse")
        return False

    def promise_wait(self, version: int) -> float:
        """How long a peer's promise of a unit of `version` holds: `PROMISE_WAIT`, or
        `PROMISE_PACE` times the longest this member's own seed transfer of a unit has taken
        (done or still going) if that is longer, at most `PROMISE_WAIT_MAX`. At 32 members
        sharing a seed's upload every unit took longer than 5 s and every honest promise
        lapsed: 123-176 false verdicts a run, each taking an honest member out of the deal.
        The pace is this member's own measure, so a peer cannot lengthen it; a liar's promise
        costs at most one such wait, and only where the seed is that slow anyway."""
        now = trio.current_time()
        going = [now - t for t in self._seeding.get(version, {}).values()]
        longest = max([self._seed_unit_s.get(version, 0.0), *going])
        return min(PROMISE_WAIT_MAX, max(PROMISE_WAIT, PROMISE_PACE * longest))

    def seed_fetch_started(self, version: int, index: int) -> None:
        """This member asked a seed for a unit (its first ask starts the clock)."""
        self._seeding.setdefault(version, {}).setdefault(index, trio.current_time())

    def unit_done(self, version: int, index: int, won: bool) -> None:
        """A unit's fetch ended (`won`: its bytes are held); a seed transfer's time counts."""
        began = self._seeding.get(version, {}).pop(index, None)
        if began is not None and won:
            took = trio.current_time() - began
            self._seed_unit_s[version] = max(self._seed_unit_s.get(version, 0.0), took)

    def preferred(self, index: int) -> bool:
        """Whether the unit is this member's share of the first copies: units are dealt
        round-robin over the members that may do their part (`count_members`, by URL), so
        that members asking a seed for units nobody has ask for different ones."""
        return self._owner(index) == (self.own_url or "")

    def _owner(self, index: int) -> str:
        """The member unit `index` is dealt to (this member's own URL among them)."""
        return self._members[index % len(self._members)]

    def reserved(self, version: int, index: int) -> bool:
        """Whether the unit is dealt to a peer this member watches for `version`: only such a
        peer can be seen claiming it, and judged if it does not (`judge_shares`). A unit dealt
        to a peer not watched (a swarm of more than `max_peers`) is taken like any other:
        waiting for it let announced URLs that nobody watches hold units in every version."""
        owner = self._owner(index)
        if owner == (self.own_url or ""):
            return False
        if len(self._members) - 1 > self.max_peers:
            return owner in self._watched.get(version, ())
        # Every usable peer is watched: so say before the watch's first round has run (the
        # fetch's first picks may come before it).
        return not self.picker.dropped(owner, version)

    def answering(self, version: int) -> int:
        """Peers that answered a bitfield request for `version`, with a bitfield or with "not
        mirroring it yet" (a URL from a forged announcement counts only once it answers)."""
        return len(self._have.get(version, ()))

    def count_members(self) -> None:
        """Deal shares over the peers that may do their part: not unreachable, not caught
        shirking, not banned for bad bytes. Counting every peer heard of let one that had
        left (a banned node's relay, still announced for `TTL`) hold its share of every
        version for the whole grace: the default demo took 115-128 s instead of 34-45 s."""
        out = self._shirkers | self._unreachable.keys()
        peers = [p for p in self.peers() if p not in out and not self.picker.banned_url(p)]
        self._members = sorted({*peers, self.own_url or ""})

    def judge_shares(self, version: int, total: int) -> list[str]:
        """At the end of a fetch's grace: the watched peers that claimed (held, or said they
        were fetching) none of their share of `version` are shirkers from now on, each having
        cost this member that grace once. An honest member takes its own share first and
        claims the first unit within a bitfield poll; a dead or lying one costs the grace
        once, not every version. Returns them."""
        claims, answered = self._claims.get(version, {}), self._have.get(version, {})
        n = len(self._members)
        caught = [
            url
            for rank, url in enumerate(self._members)
            if url in answered  # a peer not watched is not judged
            and rank < total
            and not claims.get(url, set()) & set(range(rank, total, n))
        ]
        self._shirk(caught, "claimed none of their share")
        return caught

    def _shirk(self, urls: list[str], why: str) -> None:
        """Deal `urls` no share and believe none of their promises from now on."""
        fresh = [u for u in urls if u not in self._shirkers]
        if fresh:
            log.info("peers no longer waited for (%s): %s", why, fresh)
            self._shirkers.update(fresh)
            self.count_members()

    def _answered(self, url: str, ok: bool) -> None:
        """Track whether `url` answers bitfield requests; a change re-deals the shares."""
        was = url in self._unreachable
        if ok:
            self._unreachable.pop(url, None)
        else:
            self._unreachable[url] = trio.current_time()
        if (url in self._unreachable) != was:
            self.count_members()

    def _watchable(self, url: str, version: int) -> bool:
        """Whether `url` may take a watch slot for `version`: not dropped by the picker, and
        no failed bitfield request in the last `UNREACHABLE_RETRY_S`. Announced URLs that
        never answer are free to make, and kept their slots for the whole version: a member
        watching 8 of them watched no honest peer at all."""
        if url in self.own:
            return False
        failed = self._unreachable.get(url)
        lately = failed is not None and trio.current_time() - failed < UNREACHABLE_RETRY_S
        return not lately and not self.picker.dropped(url, version)

    async def watch(
        self,
        version: int,
        m: Manifest,
        missing: Callable[[], int] | None = None,
        wanted: Callable[[], str] | None = None,
    ) -> None:
        """Follow the bitfields of up to `max_peers` usable peers while `version` is
        mirrored (until cancelled). `missing()` is how many of the version's units this
        member still lacks (default: all); see `have_gap`. `wanted()`, the bitfield of those
        units, lets a peer's long-poll answer only changes to them (default: any change)."""
        self._have[version] = {}
        self._promised[version] = {}
        self._claims[version] = {}
        total = sum(len(units(m, p)) for p in m.payload)
        missing = missing or (lambda: total)
        watched: dict[str, trio.CancelScope] = {}
        self._watched[version] = watched
        judge_at = trio.current_time() + SHARE_GRACE
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    self.learn()
                    if judge_at is not None and trio.current_time() >= judge_at:
                        self.judge_shares(version, total)
                        judge_at = None
                    self.count_members()
                    for url, scope in list(watched.items()):
                        if not self._watchable(url, version):
                            # bad bytes, stalls or lies; or no answer: its slot goes to another
                            scope.cancel()
                            del watched[url]
                            self._have[version].pop(url, None)
                    fresh = [
                        u for u in self.peers() if u not in watched and self._watchable(u, version)
                    ]
                    random.shuffle(fresh)
                    for url in fresh[: self.max_peers - len(watched)]:
                        watched[url] = trio.CancelScope()
                        nursery.start_soon(
                            self._follow_have, version, url, total, watched[url], missing, wanted
                        )
                    await trio.sleep(WATCH_REFRESH)
        finally:
            self._have.pop(version, None)
            self._promised.pop(version, None)
            self._claims.pop(version, None)
            self._seeding.pop(version, None)
            self._seed_unit_s.pop(version, None)
            self._watched.pop(version, None)
            self._listeners.pop(version, None)

    def listen(self, version: int, wake: Callable[[], None]) -> None:
        """Call `wake` whenever a peer's bitfield for `version` brings news, until its
        watch ends."""
        self._listeners.setdefault(version, []).append(wake)

    async def _follow_have(
        self,
        version: int,
        url: str,
        total: int,
        scope: trio.CancelScope,
        missing: Callable[[], int],
        wanted: Callable[[], str] | None,
    ) -> None:
        held = -1
        changes = -1
        failures = 0
        not_yet = 0  # "not mirroring it yet" answers in a row
        # Units this peer has claimed to hold, or to be fetching, in any answer: only an
        # answer that claims one for the first time earns a short gap, so a peer that
        # answers every poll at once with nothing new is polled at `HAVE_MAX_GAP`, and one
        # that claims something new each time can do so at most twice per unit.
        claimed: set[int] = set()
        promised: set[int] = set()
        with scope:
            while held < total and failures < 3:
                try:
                    params: dict = {"after": held, "changes": changes, "wait": HAVE_WAIT}
                    if wanted is not None and total <= MAX_WANT_UNITS:
                        # A peer's changes to units this member holds are of no use to it:
                        # near the end they were most of the answers, each a round trip on
                        # two CPU-bound Python servers.
                        params["want"] = wanted()
                    with trio.fail_after(HAVE_WAIT + REQUEST_TIMEOUT):
                        status, body = await get_capped(
                            self.http, f"{url}/v/{version}/have", MAX_HAVE_BYTES, params
                        )
                    self._answered(url, True)
                    if status == 404:  # not mirroring it (yet): ask again later
                        if version in self._have:  # else its watch ended meanwhile
                            self._have[version].setdefault(url, set())
                        await trio.sleep(not_yet_gap(not_yet))
                        not_yet += 1
                        continue
                    not_yet = 0
                    if status != 200:
                        raise ValueError(f"HTTP {status}")
                    answer = decode(HAVE, body)
                    bits = _bits(answer.bits, total)
                    soon = _bits(answer.soon, total) if answer.soon else set()
                    held = len(bits)
                    changes = held if answer.changes is None else answer.changes
                    failures = 0
                    self._note(version, url, bits, soon)
                    self.picker.note_streams(url, answer.streams)
                    news = not bits <= claimed or not soon <= promised
                    claimed |= bits
                    promised |= soon
                    if news:
                        for wake in self._listeners.get(version, []):
                            wake()
                    await trio.sleep(have_gap(missing(), total) if news else HAVE_MAX_GAP)
                except (httpx.HTTPError, trio.TooSlowError, ValueError, BadAnswer):
                    failures += 1
                    self._answered(url, False)
                    await trio.sleep(WATCH_REFRESH)
                except ResponseTooLarge:
                    return

    def _note(self, version: int, url: str, bits: set[int], soon: set[int]) -> None:
        if version not in self._have:
            return  # the version's watch ended while the request ran
        self._have[version][url] = bits
        self._claims[version].setdefault(url, set()).update(bits, soon)
        if url in self._shirkers:
            return  # its promises hold nobody up
        now = trio.current_time()
        for index in soon:
            self._promised[version].setdefault(index, (now, url))


def have_gap(missing: int, total: int) -> float:
    """Seconds to wait before the next poll of a peer's bitfield, given the units of the
    version's `total` this member still lacks. The wait batches a busy peer's changes (each
    answer is an HTTP round trip on two CPU-bound Python servers), which is cheap while most
    units are still to come; near the end a member lacks only a few units, a late answer
    delays its last ones directly, and few changes are left to hear of. So the gap shrinks
    with the square of the share still missing: `HAVE_MAX_GAP` with nothing held, a quarter
    of it at half, never under `HAVE_MIN_GAP` (a peer that answers every poll at once costs
    this member at most 1/HAVE_MIN_GAP requests a second). Measured against a fixed 0.5 s
    and a linear rule in docs/shardcast.md. A version of `SMALL_VERSION` units or fewer is
    asked again at once after an answer with news: there is nothing to batch (a peer's
    long-poll answers at most twice per unit, once claimed and once held, so news comes at
    most 2 x `SMALL_VERSION` times per peer), and its transfers take milliseconds, so a
    0.05 s gap after news is up to 0.05 s late to hear of the next unit. (With a flat 0.5 s
    the share rule kept members 0.35-0.5 s from their peers' units. The 0.1 s wait that
    remained in a 3-unit delta of the tiny model was the fetch worker's, asleep after the
    news had come: `Swarming.listen` wakes it; the two were measured together.)"""
    if total <= SMALL_VERSION:
        return 0.0
    return max(HAVE_MIN_GAP, HAVE_MAX_GAP * min(1.0, missing / max(total, 1)) ** 2)


def not_yet_gap(answers: int) -> float:
    """Seconds to wait before asking again a peer that answered "not mirroring it yet"
    `answers` times in a row: `HAVE_MIN_GAP`, doubling up to `WATCH_REFRESH`. Members hear of
    a new version within milliseconds of each other, so the first asks mostly come just too
    early; a flat second after each made every member of a small version wait a second for
    its peers' units (1.0 s of the 1.1 s a 2.4 MB delta took to reach 2 nodes). A peer that
    never mirrors it costs about one request a second, as before."""
    return min(WATCH_REFRESH, HAVE_MIN_GAP * 2**answers)


def _bits(hexbits: str, total: int) -> set[int]:
    """Shard indices set in a peer's hex bitfield (MSB first); ValueError if malformed."""
    if len(hexbits) != 2 * (-(-total // 8)):
        raise ValueError("bitfield of the wrong length")
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(hexbits), dtype=np.uint8))[:total]
    return set(np.flatnonzero(bits).tolist())


def swarming(
    watch: PeerWatch,
    version: int,
    m: Manifest,
    seeds: set[str],
    seed_parallel: int,
    promise: Callable[[ShardJob], None],
) -> Swarming:
    """The fetcher's view of the swarm for `version`: who holds a unit, whether a peer
    promised it, whether it is this member's share; `promise` advertises our own."""
    first = shard_index(m)
    watch.count_members()  # before the first picks, not at the watch's first round

    def index(job: ShardJob) -> int:
        return first[job.name] + job.index

    def seed_fetch(job: ShardJob) -> None:
        watch.seed_fetch_started(version, index(job))
        promise(job)

    return Swarming(
        holders=lambda job: watch.holders(version, index(job)),
        seeds=seeds,
        seed_parallel=seed_parallel,
        members=lambda: 1 + watch.answering(version),
        promised=lambda job: watch.promised(version, index(job)),
        preferred=lambda job: watch.preferred(index(job)),
        reserved=lambda job: watch.reserved(version, index(job)),
        on_seed_fetch=seed_fetch,
        on_unit_done=lambda job, won: watch.unit_done(version, index(job), won),
        listen=lambda wake: watch.listen(version, wake),
    )
