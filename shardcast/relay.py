"""The relay: mirrors versions from one or more upstreams and re-serves them.

It long-polls each upstream's `/versions`, so it hears of a new version as soon as the
upstream has it. It then fetches the signed manifest (checked against the pool's key),
announces the version at once and mirrors its shards from all upstreams, each shard
becoming servable the moment it is verified (cut-through): a client or a deeper relay that
asks early simply waits for that shard. Per-shard retries are bounded; a version that every
upstream stops listing or answers 404 for is abandoned and dropped, and the relay goes on
with newer ones; an abandoned version still listed is tried again after `RETRY_ABANDONED_S`
(the upstream may have been restarting), so a node that reads only through its own relay is
never left without the version its pool trains on. Its own retention keeps the newest `keep`
versions, their delta chains, and the versions their signed manifests `requires` (a LoRA
base), which it mirrors as soon as it reads a manifest that requires them.

Upstreams are untrusted like any source: shard transfers have the client's minimum rate and
hedging (see fetcher), each version's mirroring has an overall deadline, and an upstream
that lists a version it cannot serve is muted for a while, so fake versions cannot crowd
out real ones. `trust_version` (from signed data, where the relay runs inside a node) caps
which listed versions are believed at all.

Given an `identity`, the relay is a swarm member (what every node runs by default): it
announces itself, learns peers by gossip, and mirrors each version from its peers as well
as its upstreams, rarest shard first, sending at most `seed_parallel` transfers at a time
to the upstreams (see swarm.py). Versions still come only from the upstreams' listings;
peers are sources of shards, never of versions.
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from pathlib import Path

import httpx
import trio

from protocol.identity import Identity
from shardcast.client import LISTING_ERRORS, fetch_manifest, get_listing
from shardcast.errors import ShardcastError, first_error
from shardcast.fetcher import (
    FetchPolicy,
    ShardFetcher,
    ShardJob,
    disk_error,
    http_client,
    prepare_file,
    unit_jobs,
)
from shardcast.limits import ServeLimits
from shardcast.manifest import Manifest, with_requirements
from shardcast.peerlist import PeerListHolder
from shardcast.peers import PeerTable
from shardcast.server import create_app, serve_app
from shardcast.sources import SourcePicker
from shardcast.store import DEFAULT_KEEP, StoredVersion, VersionStore
from shardcast.swarm import OwnUrls, PeerWatch, swarming
from shardcast.throttle import UploadThrottle

log = logging.getLogger(__name__)
RETRY_ABANDONED_S = 10.0
"""Seconds before a version given up on is mirrored again, if an upstream still lists it: long
enough that a version nobody can serve costs one manifest request per period, short enough
that a coordinator restart delays a joining node by seconds, not until the next version."""

MIN_POLL_GAP = 0.5  # seconds between two polls of one upstream, at least
WHOLE_SHARDS_IN_FLIGHT = 3


class Relay:
    def __init__(
        self,
        upstreams: list[str],
        root: Path,
        *,
        public_key: bytes,
        pool_id: str,
        keep: int = DEFAULT_KEEP,
        rate: float | None = None,
        policy: FetchPolicy | None = None,
        shard_wait: float = 30.0,
        poll_wait: float = 25.0,
        limits: ServeLimits | None = None,
        identity: Identity | None = None,
        own: OwnUrls | None = None,
        max_peers: int = 8,
        seed_parallel: int = 2,
        mounts: dict[str, httpx.AsyncBaseTransport] | None = None,
        source_address: str | None = None,
    ) -> None:
        if not upstreams:
            raise ShardcastError("a relay needs at least one upstream")
        self.upstreams = [u.rstrip("/") for u in upstreams]
        self.public_key = public_key
        self.pool_id = pool_id
        self.policy = policy or FetchPolicy(parallel=8)
        self.poll_wait = poll_wait
        self.store = VersionStore(root, keep)
        self.store.load_existing(public_key, pool_id)
        self.bucket = UploadThrottle(rate) if rate else None
        self.peers = PeerTable(pool_id, identity.public_key if identity else None)
        self.peer_list = PeerListHolder(public_key, pool_id)
        self.app = create_app(
            self.store,
            self.bucket,
            shard_wait=shard_wait,
            limits=limits,
            peers=self.peers,
            peer_list=self.peer_list,
        )
        self.identity = identity
        self.own = own
        """This member's URLs, shared with its node (`OwnUrls`); a fresh set when None."""
        self.max_peers = max_peers
        self.seed_parallel = seed_parallel
        self.watch: PeerWatch | None = None
        self.picker = SourcePicker(self.upstreams)
        self.url: str | None = None
        self.bad_upstreams: list[tuple[str, int, str, int]] = []
        self.abandoned: dict[int, float] = {}
        """Versions given up on -> trio time before which they are not tried again."""
        self._listed: dict[str, dict[int, int | None]] = {}
        self._mirroring: dict[int, trio.CancelScope] = {}
        self._http: httpx.AsyncClient | None = None
        self.mounts = mounts
        """Transports for upstreams of other schemes (`p2p://`: members behind NAT)."""
        self.source_address = source_address
        """The local address this relay's requests come from (default: the system's)."""
        self.trusted: int | None = None

    def trust_version(self, version: int) -> None:
        """`version` is known real (from signed data): listed versions above the newest such
        one are ignored. Without it, every listing is heard until its source is caught."""
        if self.trusted is None or version > self.trusted:
            self.trusted = version

    async def run(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve and follow the upstreams until cancelled; `task_status` gets the URL."""
        self._http = http_client(self.policy, self.mounts, self.source_address)
        try:
            async with trio.open_nursery() as nursery:
                self.url = await nursery.start(serve_app, self.app, host, port)
                if self.identity is not None:
                    self.watch = PeerWatch(
                        self._http,
                        self.peers,
                        self.picker,
                        self.upstreams,
                        self.identity,
                        self.max_peers,
                        self.peer_list,
                        self.own,
                    )
                    nursery.start_soon(self.watch.run, self.url)
                for url in self.upstreams:
                    nursery.start_soon(self._follow, url, nursery)
                task_status.started(self.url)
        finally:
            await self._http.aclose()

    async def _follow(self, upstream: str, nursery: trio.Nursery) -> None:
        """Long-poll one upstream forever; a dead upstream is retried with capped backoff."""
        assert self._http is not None
        after = -1
        failures = 0
        while True:
            began = trio.current_time()
            try:
                listing = await get_listing(self._http, upstream, after, self.poll_wait)
            except LISTING_ERRORS as e:
                failures += 1
                delay = min(5.0, 0.1 * 2**failures) * random.uniform(0.5, 1.0)
                log.info("upstream %s: %s; retrying in %.1fs", upstream, e, delay)
                await trio.sleep(delay)
                continue
            failures = 0
            self._listed[upstream] = listing
            self.picker.note_listing(upstream, list(listing))
            if listing:
                after = max(after, max(listing))
            await self._reconcile(nursery)
            # An upstream that answers at once, every time, must not make us spin.
            await trio.sleep(max(0.0, MIN_POLL_GAP - (trio.current_time() - began)))

    def _wanted(self) -> set[int]:
        """The newest `keep` believable versions listed, plus their delta chains and what the
        manifests of those held (or being mirrored) require. Listings of upstreams caught
        lying are not heard while another upstream lists anything; requirements come from
        signed manifests only, never from a listing."""
        now = trio.current_time()
        heard = [x for u, x in self._listed.items() if self.picker.heard(u)]
        bases: dict[int, int | None] = {}
        for listing in heard or self._listed.values():
            bases.update(listing)
        believable = [
            v
            for v in bases
            if not self._resting(v, now) and (self.trusted is None or v <= self.trusted)
        ]
        wanted: set[int] = set()
        for v in sorted(believable, reverse=True)[: self.store.keep]:
            while v is not None and v not in wanted and v in bases:
                wanted.add(v)
                v = bases[v]
        return with_requirements(wanted, self._signed_requires)

    def _signed_requires(self, version: int) -> list[int]:
        sv = self.store.versions.get(version)
        return sv.manifest.requires if sv is not None else []

    async def _reconcile(self, nursery: trio.Nursery) -> None:
        listed = set().union(*(set(x) for x in self._listed.values()))
        now = trio.current_time()
        # A version still being mirrored that no upstream lists any more will never finish.
        for v, scope in list(self._mirroring.items()):
            if v not in listed:
                log.info("v%d was dropped upstream; abandoning it", v)
                scope.cancel()
        for v in sorted(self._wanted()):
            if v in self.store.versions or v in self._mirroring or self._resting(v, now):
                continue
            if self.store.versions and v < min(self.store.retained()):
                continue  # older than anything we keep: it would be pruned at once
            scope = trio.CancelScope()
            self._mirroring[v] = scope
            nursery.start_soon(self._mirror, v, scope, nursery)

    async def _mirror(self, version: int, scope: trio.CancelScope, nursery: trio.Nursery) -> None:
        assert self._http is not None
        sv: StoredVersion | None = None
        try:
            with scope, trio.fail_after(self.policy.deadline):
                m, raw = await fetch_manifest(
                    self._http,
                    self.picker,
                    version,
                    public_key=self.public_key,
                    pool_id=self.pool_id,
                    first=self.upstreams,
                )
                folder = self.store.folder(version)
                jobs = []
                try:
                    await trio.to_thread.run_sync(self._prepare, folder, raw, m)
                except OSError as e:
                    raise disk_error(e, folder) from None
                for p in m.payload:
                    jobs += unit_jobs(m, p, folder / "payload" / p.name)
                sv = StoredVersion(m, raw, folder, complete=False)
                self.store.add(sv)  # announced now: downstream may start asking for shards
                if any(r not in self.store.versions for r in m.requires):
                    await self._reconcile(nursery)  # now `_wanted` knows what `m` requires

                def report(url: str, v: int, job: ShardJob) -> None:
                    self.bad_upstreams.append((url, v, job.name, job.index))

                swarm = None
                if self.watch is not None:
                    swarm = swarming(
                        self.watch,
                        version,
                        m,
                        set(self.upstreams),
                        self.seed_parallel,
                        lambda j: sv.promise(j.name, j.index),
                    )
                fetcher = ShardFetcher(
                    self._http, self.picker, self._policy_for(m), on_corrupt=report, swarm=swarm
                )
                try:
                    async with trio.open_nursery() as watching:
                        if self.watch is not None:
                            watching.start_soon(
                                self.watch.watch,
                                version,
                                m,
                                lambda: sv.total - sv.held,
                                sv.want_bitfield,
                            )
                        await fetcher.fetch(
                            version,
                            jobs,
                            on_done=lambda j: sv.mark(j.name, j.index),
                            unit_bytes=m.unit,
                        )
                        watching.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    # The nursery wraps the fetch's error; unwrapped, a failed mirror is a
                    # give-up below rather than an error that ends the node it runs in. A
                    # prune cancels a mirror while its units are landing, and writes into the
                    # removed folder fail beside the cancellations: that too is a give-up (it
                    # ended a late joiner mirroring a dozen versions at once).
                    raise first_error(group, cancelled=scope.cancel_called) from None
                log.info("mirrored v%d (%d bytes)", version, m.payload_bytes)
                self.abandoned.pop(version, None)
                for gone in await self.store.prune():
                    if gone in self._mirroring:
                        self._mirroring[gone].cancel()
            if scope.cancelled_caught:
                self._abandon(version)
                await self.store.drop(version)
        except (ShardcastError, trio.TooSlowError) as e:
            log.warning("giving up on v%d: %s", version, e or "deadline passed")
            self._abandon(version)
            await self.store.drop(version)
        finally:
            self._mirroring.pop(version, None)

    def _abandon(self, version: int) -> None:
        self.abandoned[version] = trio.current_time() + RETRY_ABANDONED_S

    def _resting(self, version: int, now: float) -> bool:
        """Whether `version` was given up on too recently to be tried again."""
        return self.abandoned.get(version, -1.0) > now

    def _policy_for(self, m: Manifest) -> FetchPolicy:
        """Whole shards (a manifest without pieces) go WHOLE_SHARDS_IN_FLIGHT at a time when
        mirroring from upstreams only: they then complete one after another and each is
        re-served at once (cut-through); many in parallel would all finish together at the
        end, which is store-and-forward again. Pieces are small enough to run `parallel`
        at once and still land in order; a swarm member caps its upstream share by
        `seed_parallel` instead."""
        if m.piece_size is not None or self.identity is not None:
            return self.policy
        return replace(self.policy, parallel=min(self.policy.parallel, WHOLE_SHARDS_IN_FLIGHT))

    @staticmethod
    def _prepare(folder: Path, raw: bytes, m: Manifest) -> None:
        (folder / "payload").mkdir(parents=True, exist_ok=True)
        (folder / "manifest").write_bytes(raw)
        for p in m.payload:
            prepare_file(folder / "payload" / p.name, p.size)
