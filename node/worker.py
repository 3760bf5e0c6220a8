"""The node's worker loop: find the pool, join, follow the weights, and turn leases into
verified rollouts.

    discover (pool id + bootstrap) -> join (with a proof of work when the pool asks) -> fetch
    weights -> load engine
    loop: lease -> generate (seeded, captured, proven) -> sign and submit -> receipt
    beside it: heartbeats, and new versions fetched in the background (swapped in between
    leases, never inside one)

Everything the coordinator says is signed and checked (the host pins its key); the spec must
hash to the pool id; manifests must carry the coordinator's signature. The node branches on the
typed `code` of every reply, never on its human-readable `reason`. When the coordinator is
unreachable the node retries with jittered exponential backoff through tenacity (so a restarted
coordinator is not met by every node at once), runs discovery again after repeated failures, and
carries on when it returns.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, TypeVar

import trio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_result,
    wait_random_exponential,
)
from tenacity.retry import retry_base
from tenacity.wait import wait_base

from node.behaviour import Behaviour, NodeContext
from node.engine import Engine, HFEngine
from node.hardware import probe
from node.multiturn import TurnEngine
from node.seeding import (
    NatMode,
    keep_seeding,
    keep_slots,
    make_seeder,
    move_behind_hop,
    p2p_relay_url,
    seed_behind_nat,
)
from protocol import messages as msg
from protocol import pow as join_pow
from protocol.discovery import PoolBook, PoolLocation, discover, follow_pool_record, serve_discovery
from protocol.environments import environment_for
from protocol.errors import DiscoveryError, RemoteError, SwarmError, TransportError
from protocol.host import ErrorCode, Host, pool_topic
from protocol.identity import Identity
from protocol.ratelimit import TokenBucket
from shardcast.client import Client, FetchResult
from shardcast.errors import ShardcastError
from shardcast.fetcher import FetchPolicy, http_client
from shardcast.nat import P2PNode, p2p_mounts
from shardcast.relay import Relay
from shardcast.swarm import OwnUrls

log = logging.getLogger("swarmrl.node")

T = TypeVar("T")

# Remote error codes that a later try can succeed after; any other refusal is final. The
# coordinator's load (`overloaded`, `peer_busy`) and a stale envelope (a clock, or a retry
# sealed anew next time) are the pool's state, not this node's fault: taken as final, a flood
# of strangers' requests that filled the coordinator's buffers made every honest node exit.
RETRYABLE_REMOTE = frozenset(
    {
        ErrorCode.RATE_LIMITED,
        ErrorCode.TIMEOUT,
        ErrorCode.INTERNAL,
        ErrorCode.OVERLOADED,
        ErrorCode.PEER_BUSY,
        ErrorCode.STALE,
    }
)
# Join attempts in a row that got no answer before the node asks its peers again where the
# coordinator is (it may have moved, or come back on another address).
REDISCOVER_AFTER = 3
# Idle waits (no lease to be had) grow to this at most on top of the coordinator's
# retry_after_s: the coordinator paces the pool, the jitter only spreads nodes apart.
IDLE_JITTER_MAX_S = 2.0
# The first retry waits less than this; the window doubles with each try up to a cap.
FIRST_RETRY_S = 0.5
# The longest wait a coordinator's reply may ask of this node (a retry, a heartbeat's period),
# and the shortest heartbeat period it may ask for.
MAX_WAIT_S = 600.0
MIN_HEARTBEAT_S = 1.0
# The share of the pool's per-peer request rate (`limits.requests_per_s`) a node keeps to:
# heartbeats and retries fit in the rest.
PACE_SHARE = 0.75
MAX_RESTARTS = 5
"""Restarts after unexpected errors allowed in an hour; one more ends the node: an error that
keeps coming back is a bug to report, not a hiccup to ride out."""
# How long a lease request offers to wait for work when the pool has enough in flight
# (`LeaseRequest.wait_s`): the coordinator leases the moment its trainer needs more.
LEASE_WAIT_S = 5.0


class NodeError(SwarmError):
    """A reason for the node to stop: banned, refused, misconfigured."""


@contextlib.contextmanager
def node_errors_unwrapped() -> Iterator[None]:
    """Let a `NodeError` out of trio nurseries as itself. A nursery wraps what its tasks raise
    in an ExceptionGroup; callers of a node want the one reason it stopped."""
    try:
        yield
    except BaseExceptionGroup as group:
        found = group.subgroup(lambda e: isinstance(e, NodeError))
        if found is None:
            raise
        while isinstance(found, BaseExceptionGroup):
            found = found.exceptions[0]
        raise found from None


def retryable(error: BaseException) -> bool:
    """Whether a later try can succeed: the coordinator or the network was away, or the
    coordinator said "later". Any other refusal is final."""
    if isinstance(error, RemoteError):
        return error.code in RETRYABLE_REMOTE
    return isinstance(error, (TransportError, DiscoveryError, ShardcastError))


def retry_after_s(state: RetryCallState) -> float:
    """The wait the coordinator named for the last try (an error's or a reply's
    `retry_after_s`); 0 when it named none."""
    outcome = state.outcome
    assert outcome is not None
    said = outcome.exception() if outcome.failed else outcome.result()
    return seconds_within(getattr(said, "retry_after_s", 0.0), 0.0, MAX_WAIT_S)


def seconds_within(said: float, low: float, high: float) -> float:
    """A duration the coordinator named, kept within [low, high] (NaN as `low`): a value no
    pool needs (inf, NaN) would stop this node's heartbeats or retries for good."""
    return low if math.isnan(said) else min(max(said, low), high)


def jittered(cap_s: float) -> wait_base:
    """Full jitter: each wait is drawn uniformly below a window that doubles from
    `FIRST_RETRY_S` up to `cap_s`, on top of the coordinator's `retry_after_s` (a floor).
    Without the jitter, every node that lost a restarted coordinator would come back in the
    same instant, again and again."""
    return wait_random_exponential(multiplier=FIRST_RETRY_S, max=cap_s) + retry_after_s


def retrying(cap_s: float, retry: retry_base, **options: Any) -> AsyncRetrying:
    """A fresh retry loop on trio with jittered waits. One per call: tenacity keeps the state
    of a loop in its retrying object, so concurrent calls must not share one."""
    return AsyncRetrying(sleep=trio.sleep, wait=jittered(cap_s), retry=retry, **options)


@dataclass
class NodeStats:
    """What the status line shows."""

    state: str = "starting"
    version: int = -1
    leases: int = 0
    rollouts: int = 0
    tokens: int = 0
    seconds_generating: float = 0.0
    accepted: int = 0
    soft_rejected: int = 0
    hard_rejected: int = 0
    coordinator_version: int = 0
    started: float = field(default_factory=time.time)
    replies: Counter[str] = field(default_factory=Counter)
    """Replies by kind and code ("lease:quota", "receipt:refused", ...)."""
    restarts: int = 0
    """Times the node started again after an unexpected error (`Worker.run`)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds_generating if self.seconds_generating else 0.0


@dataclass
class WorkerOptions:
    bootstrap: list[str]
    data_dir: Path
    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    device: str = "cpu"
    relay_port: int | None = None
    """Also serve the weights this node holds to other nodes on this HTTP port."""
    relay_host: str = "127.0.0.1"
    reseed: bool = True
    """Re-serve held weights to peers (node/seeding.py), on `relay_port` or any free port."""
    upload_cap_mb: float | None = None
    nat: NatMode = NatMode.AUTO
    """Serve the seeder over libp2p through the coordinator's relay hop (`--nat`)."""
    max_leases: int | None = None
    """Stop after this many leases (tests, benchmarks)."""
    backoff_max_s: float = 30.0
    restart_wait_s: float = 5.0
    """The wait before the first restart after an unexpected error (doubling each time)."""


class Worker:
    def __init__(
        self,
        identity: Identity,
        pool_id: str,
        engine: Engine,
        options: WorkerOptions,
        behaviour: Behaviour | None = None,
    ):
        self.identity = identity
        self.behaviour = behaviour or Behaviour()
        self.pool_id = pool_id
        self.engine = engine
        self.options = options
        self.stats = NodeStats()
        self.location: PoolLocation | None = None
        self.client: Client | None = None
        self._host: Host | None = None
        self._p2p: P2PNode | None = None
        self._own_urls = OwnUrls()
        """The seeder's URLs: its HTTP one, and the `p2p://` one when served over libp2p."""
        self._unreachable = trio.Event()
        """Set when the coordinator finds nobody answering at this node's relay URL, or will not
        probe it (it names another address than this node connects from)."""
        self._book = PoolBook(pool_id)
        self._newest_fetched = -1
        self._trusted_version = -1
        self._seeder: Relay | None = None
        """The seeder running now (`keep_seeding` builds a new one on each restart)."""
        self._lease: msg.Lease | None = None
        self._bucket: TokenBucket | None = None
        """Paces this node's requests to the coordinator (`_pace`)."""
        self._relay_url = ""
        self._pow_nonce: int | None = None
        self._stopping = False
        self._joined = False
        """Whether the current run got past its join (only then is an error worth a restart)."""
        self.idle = trio.Event()
        """Set while no lease is being worked on (a stop can proceed at once)."""
        self.idle.set()

    # ------------------------------------------------------------------ top level

    async def run(self) -> None:
        """Work for the pool until stopped; raises `NodeError` when the node may not go on
        (banned, refused, misconfigured).

        An unexpected error once the node has joined (a bug, in our code or a library, met by
        one component) starts the node again, fresh, after a wait that doubles each time, up
        to `MAX_RESTARTS` an hour: a volunteer's node should not stop for good at the first
        one while nobody watches. Its first join then gives back the lease it held. An error
        before the join is most likely the setup's (an address, a device) and ends the node."""
        restarts: list[float] = []
        try:
            while True:
                self._joined = False
                try:
                    with node_errors_unwrapped():
                        await self._run()
                    return
                except NodeError:
                    raise
                except Exception as e:
                    now = time.monotonic()
                    restarts = [t for t in restarts if now - t < 3600.0]
                    if not self._joined or self._stopping or len(restarts) >= MAX_RESTARTS:
                        raise
                    restarts.append(now)
                    wait = self.options.restart_wait_s * 2 ** (len(restarts) - 1)
                    log.error("the node failed; starting it again in %.0f s", wait, exc_info=e)
                    await self._forget_run()
                    self.stats.restarts += 1
                    self.stats.state = f"restarting in {wait:.0f} s"
                    await trio.sleep(wait)
        finally:
            if self.client is not None:
                await self.client.aclose()

    async def _forget_run(self) -> None:
        """Drop what the failed run held (its host, client, seeder URLs, lease); keep the
        identity, the loaded weights and what this node has learnt to trust."""
        if self.client is not None:
            await self.client.aclose()
        self.client = None
        self._host = self._p2p = self.location = None
        self._own_urls = OwnUrls()
        self._unreachable = trio.Event()
        self._relay_url = ""
        self._lease = None
        self.idle.set()

    async def _run(self) -> None:
        async with (
            Host.open(self.identity, self.pool_id, self.options.listen) as host,
            # `p2p://peer/<id>` sources (nodes behind NAT) for the client and the seeder, and
            # the seeder served over streams when this node cannot be dialled.
            seed_behind_nat(host.libp2p) as p2p,
            trio.open_nursery() as nursery,
        ):
            self._host, self._p2p = host, p2p
            self.stats.state = "discovering"
            self.location = await self._retry(
                "discovery", partial(discover, host, self.options.bootstrap, book=self._book)
            )
            # The coordinator runs the pool's relay hop (when it runs one at all).
            p2p.use_hops(self.location.coordinator_addrs)
            # Its connection is never closed to make room for strangers (its dial-backs and
            # relay checks come in on it).
            host.prefer(self.location.coordinator_peer_id.__eq__)
            serve_discovery(host, self._book)  # this node now helps newcomers find the pool
            # Records expire: fetch fresh ones, so what we pass on to newcomers stays valid.
            nursery.start_soon(follow_pool_record, host, self._book, self.options.bootstrap)
            spec = self.location.spec
            self.stats.state = "joining"
            reply = await self._join(fresh=True)
            self._joined = True
            sources = list(reply.weights_urls)
            if self.options.relay_port is not None or self.options.reseed:
                local_url, relay_url = await nursery.start(self._relay, sources)
                # Join again to tell the coordinator where we serve (joining is idempotent),
                # and fetch through our own relay only, so shards cross the network once (the
                # relay picks among all the upstreams). With the relay merely listed first, it
                # lacked each new version for the first moment, and nearly every byte came
                # from the upstreams twice (measured through the relay tree's source counts).
                await self._join(relay_url)
                sources = [local_url]
            policy = FetchPolicy()
            self.client = Client(
                sources,
                self.options.data_dir / "weights" / self.pool_id,
                public_key=bytes.fromhex(spec.coordinator.public_key),
                pool_id=self.pool_id,
                keep=spec.limits.max_staleness + 1,
                policy=policy,
                http=http_client(policy, p2p_mounts(p2p)),
            )
            self._trust_version(reply.current_version)
            # The behaviour starts before the weights load, so it holds its context before
            # the first lease (the fetch below yields to it at its first checkpoint).
            nursery.start_soon(self.behaviour.alongside, self.context())
            self.stats.state = "fetching weights"
            await self._fetch_and_load(initial=True)
            beat_s = seconds_within(reply.heartbeat_s, MIN_HEARTBEAT_S, MAX_WAIT_S)
            nursery.start_soon(self._heartbeats, beat_s)
            nursery.start_soon(self._follow_versions)
            await self._work()
            nursery.cancel_scope.cancel()

    def stop(self) -> None:
        """Finish (or release) the current lease, then leave."""
        self._stopping = True

    def context(self) -> NodeContext:
        """The narrow view of this node that its behaviour gets."""
        assert self._host is not None and self.location is not None
        return NodeContext(
            identity=self.identity,
            pool_id=self.pool_id,
            spec=self.location.spec,
            engine=self.engine,
            stats=self.stats,
            call=self._request,
            lease=lambda: self._lease,
            rejoin=self._join,
            release=self._release,
            stop=self.stop,
            host=self._host,
            coordinator_addrs=lambda: list(self.location.coordinator_addrs),
        )

    # ------------------------------------------------------------------ coordinator calls

    async def _call(
        self, protocol_id: str, message: msg.Message, reply_type: type, timeout_s: float = 30.0
    ) -> Any:
        """One request to the coordinator, paced (`_pace`)."""
        await self._pace()
        return await self._request(protocol_id, message, reply_type, timeout_s)

    async def _request(
        self, protocol_id: str, message: msg.Message, reply_type: type, timeout_s: float = 30.0
    ) -> Any:
        """One request to the coordinator, at once: what a behaviour gets (`NodeContext.call`),
        which keeps its own pace or, for a flooding cheat, none."""
        assert self._host is not None and self.location is not None
        last: Exception | None = None
        for addr in self.location.coordinator_addrs:
            try:
                return (
                    await self._host.request(
                        addr, protocol_id, message, reply_type, timeout_s=timeout_s
                    )
                ).message
            except TransportError as e:
                last = e
        raise last or TransportError("the coordinator has no address")

    async def _pace(self) -> None:
        """Wait until one more request stays within `PACE_SHARE` of the pool's per-peer
        request rate. The coordinator refuses requests past its limit (and closes the stream),
        and with leases held until work exists a node on a small model can want more: on the
        tiny preset a lease took 25 ms, a lease and a submission each, 80 requests a second
        against a limit of 20, and every refusal cost a reconnect."""
        assert self.location is not None
        if self._bucket is None:  # the rate is the pool's: part of the spec, fixed by its id
            rate = self.location.spec.limits.requests_per_s * PACE_SHARE
            self._bucket = TokenBucket(rate, max(1.0, rate), trio.current_time())
        while (wait := self._bucket.take(trio.current_time())) > 0:
            # at least a millisecond: a wait of 1e-17 s would not move the clock
            await trio.sleep(max(wait, 1e-3))

    async def _retry(self, what: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `fn(*args)` until it succeeds, backing off while the coordinator (or the
        network) is away. Errors that retrying cannot fix propagate."""
        attempts = retrying(
            self.options.backoff_max_s,
            retry_if_exception(retryable),
            before_sleep=partial(self._waiting, what, str),
        )
        return await attempts(fn, *args)

    def _waiting(self, what: str, why: Callable[[Any], str], state: RetryCallState) -> None:
        """Say why the last try failed and how long the node waits (`why` words a reply that
        asked to wait; an error speaks for itself)."""
        outcome = state.outcome
        assert outcome is not None
        reason = str(outcome.exception()) if outcome.failed else why(outcome.result())
        log.warning("%s failed (%s); retrying in %.1fs", what, reason, state.upcoming_sleep)
        self.stats.state = f"waiting ({what})"

    async def _join(self, relay_url: str = "", fresh: bool = False) -> msg.JoinReply:
        """Join the pool (idempotent; again whenever the coordinator forgot this node).
        Waits out a busy pool; a refusal is final. `fresh`: this process's first join, so
        leases still open under this key died with an earlier process: give them back."""
        self._relay_url = relay_url
        hardware = await trio.to_thread.run_sync(probe, self.options.device)
        request = msg.JoinRequest(
            hardware=hardware,
            engine=self.engine.name,
            software=package_version("swarmrl"),
            relay_url=relay_url,
            pow_nonce=await self._proof_of_work(),
            fresh_start=fresh,
        )
        unanswered = 0

        async def before_retry(state: RetryCallState) -> None:
            nonlocal unanswered
            assert state.outcome is not None
            unanswered = unanswered + 1 if state.outcome.failed else 0
            if unanswered and unanswered % REDISCOVER_AFTER == 0:
                await self._rediscover()
            self._waiting("join", lambda reply: f"pool busy: {reply.reason}", state)

        attempts = retrying(
            self.options.backoff_max_s,
            retry_if_exception(retryable) | retry_if_result(_join_busy),
            before_sleep=before_retry,
        )
        try:
            reply = await attempts(self._ask_to_join, request)
        except RemoteError as e:
            raise NodeError(f"the coordinator refused this node's join: {e}") from None
        if not reply.accepted:
            raise NodeError(self._join_refusal(reply))
        self.stats.coordinator_version = reply.current_version
        self._trust_version(reply.current_version)
        log.info("joined pool %s (coordinator at v%d)", self.pool_id, reply.current_version)
        return reply

    async def _ask_to_join(self, request: msg.JoinRequest) -> msg.JoinReply:
        reply = await self._call(msg.JOIN_PROTOCOL, request, msg.JoinReply)
        self.stats.replies[f"join:{reply.code}"] += 1
        return reply

    def _join_refusal(self, reply: msg.JoinReply) -> str:
        if reply.code == "banned":
            return f"this node's key is banned from the pool: {reply.reason}"
        if reply.code == "bad_pow":
            return (
                f"the coordinator rejected this node's join proof of work ({self._pow_bits()} "
                f"bits, as the pool spec asks): {reply.reason}. The coordinator and this node "
                "disagree on the spec or the proof; check the pool id and the swarmrl version"
            )
        return f"the coordinator refused to let this node join: {reply.reason}"

    def _pow_bits(self) -> int:
        assert self.location is not None
        return self.location.spec.admission.join_pow_bits

    async def _proof_of_work(self) -> int:
        """The nonce that pays for this identity's admission (solved once, off the event loop:
        it costs about 2**bits hashes)."""
        bits = self._pow_bits()
        if self._pow_nonce is None:
            if bits > 0:
                log.info("solving the pool's join proof of work (%d bits)", bits)
                self.stats.state = f"proof of work ({bits} bits)"
            try:
                self._pow_nonce = await trio.to_thread.run_sync(
                    join_pow.solve, self.pool_id, self.identity.public_key, bits
                )
            except ValueError as e:
                raise NodeError(f"cannot pay the pool's join proof of work: {e}") from None
        return self._pow_nonce

    async def _rediscover(self) -> None:
        """Ask the pool's members again where the coordinator is (it may have moved); the old
        location stays when nobody knows better."""
        assert self._host is not None and self.location is not None
        try:
            # only a record the coordinator signed since the one that led nowhere counts
            self.location = await discover(
                self._host,
                self.options.bootstrap,
                book=self._book,
                newer_than_ms=self.location.issued_ms,
            )
            log.info("rediscovered the coordinator at %s", self.location.coordinator_addrs)
            if self._p2p is not None:  # its relay hop moved with it
                self._p2p.use_hops(self.location.coordinator_addrs)
        except DiscoveryError as e:
            log.warning("discovery found nothing new: %s", e)

    async def _release(self, lease_id: int) -> str:
        receipt = await self._call(
            msg.RELEASE_PROTOCOL, msg.ReleaseLease(lease_id=lease_id), msg.Receipt, 5.0
        )
        self.stats.replies[f"release:{receipt.code}"] += 1
        return receipt.code

    # ------------------------------------------------------------------ weights

    def _trust_version(self, version: int) -> None:
        """Record the newest version named by signed coordinator data (join and heartbeat
        replies, gossiped announcements). The SHARDCAST client then ignores listings above it:
        a source's listing is only a claim, and one naming versions nobody signed would send
        the node after weights that do not exist. The seeder is told too: the client fetches
        through it, and a seeder that heard every listing mirrored a liar's fake versions,
        asking its honest sources for each (`_seeder_made`)."""
        self._trusted_version = max(self._trusted_version, version)
        if self.client is not None:
            self.client.trust_version(self._trusted_version)
        if self._seeder is not None:
            self._seeder.trust_version(self._trusted_version)

    async def _relay(
        self,
        upstreams: list[str],
        *,
        task_status: trio.TaskStatus[tuple[str, str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Re-serve the pool's weights to other nodes (default; `--relay PORT` fixes the port).
        Started with (the seeder's HTTP URL, the URL to advertise: that one, or this node's
        `p2p://peer/<id>` when it is served over libp2p instead)."""
        spec = self.location.spec
        assert self._p2p is not None
        p2p = self._p2p

        def make() -> Relay:  # a fresh one (and fresh transports) for each restart
            return self._seeder_made(
                make_seeder(
                    upstreams,
                    self.options.data_dir / "relay" / self.pool_id,
                    identity=self.identity,
                    public_key=bytes.fromhex(spec.coordinator.public_key),
                    pool_id=self.pool_id,
                    keep=spec.limits.max_staleness + 2,
                    upload_cap_mb=self.options.upload_cap_mb,
                    mounts=p2p_mounts(p2p),
                    own=self._own_urls,
                )
            )

        async with trio.open_nursery() as nursery:
            port = self.options.relay_port or 0
            url = await nursery.start(keep_seeding, make, self.options.relay_host, port)
            log.info("relaying weights at %s", url)
            advertised = await p2p_relay_url(p2p, url, self._hops(), self.options.nat)
            if advertised is not None:
                self._own_urls.announce(advertised)
                nursery.start_soon(keep_slots, p2p, self._hops)
            elif self.options.nat is NatMode.AUTO:
                nursery.start_soon(self._serve_over_nat_when_unreachable, url)
            task_status.started((url, advertised or url))

    def _seeder_made(self, seeder: Relay) -> Relay:
        """`seeder`, now the node's seeder, trusting what the node trusts."""
        if self._trusted_version >= 0:
            seeder.trust_version(self._trusted_version)
        self._seeder = seeder
        return seeder

    def _hops(self) -> list[str]:
        """The coordinator's relay hop: its addresses, which move when it is rediscovered."""
        assert self.location is not None
        return list(self.location.coordinator_addrs)

    async def _serve_over_nat_when_unreachable(self, seeder_url: str) -> None:
        """The seeder went out over HTTP (a public verdict, none, or no slot): once a dial-back
        or the coordinator's checks say nobody can reach it, serve it over libp2p and tell the
        coordinator (a join names the URL to hand out)."""
        assert self._p2p is not None
        advertised = await move_behind_hop(self._p2p, seeder_url, self._hops, self._unreachable)
        if advertised is None:
            return
        self._own_urls.announce(advertised)
        await self._join(advertised)
        await keep_slots(self._p2p, self._hops)

    async def _fetch_latest(self) -> FetchResult:
        """The newest trusted version; when that fails, ask the coordinator (a signed
        heartbeat reply) which version is current before the retry: the version trusted at
        join may have been pruned while this node waited (a restart, a slow start)."""
        assert self.client is not None
        try:
            return await self.client.fetch("latest")
        except ShardcastError:
            with trio.move_on_after(10.0):
                try:
                    reply = await self._call(
                        msg.HEARTBEAT_PROTOCOL, self._beat(), msg.HeartbeatReply, 10.0
                    )
                    self._trust_version(reply.current_version)
                except SwarmError as e:
                    log.debug("asking for the current version failed: %s", e)
            raise

    async def _fetch_and_load(self, initial: bool = False) -> None:
        assert self.client is not None
        result = await self._retry("weights", self._fetch_latest)
        self._newest_fetched = max(self._newest_fetched, result.version)
        if initial or result.version > self.engine.version:
            await trio.to_thread.run_sync(self._load, result.path, result.version)
            self.stats.version = result.version
            log.info(
                "loaded weights v%d (%.1f MB fetched in %.1fs)",
                result.version,
                result.payload_bytes / 1e6,
                result.seconds,
            )

    async def _follow_versions(self) -> None:
        """Fetch new versions in the background as soon as they are announced (gossip) or
        listed (long-poll of the weight sources, in case gossip misses one)."""
        assert self._host is not None and self.client is not None
        coordinator_key = bytes.fromhex(self.location.spec.coordinator.public_key)
        wake = trio.Event()

        async def on_gossip() -> None:
            nonlocal wake
            topic = pool_topic(self.pool_id, msg.VERSIONS_TOPIC)
            async with self._host.subscribe(
                topic, msg.VersionAnnouncement, signer=coordinator_key
            ) as sub:
                async for v in sub:
                    self.stats.coordinator_version = max(
                        self.stats.coordinator_version, v.message.version
                    )
                    self._trust_version(v.message.version)
                    wake.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(on_gossip)
            while True:
                newer = await self.client.wait_for_newer(self._newest_fetched, timeout=20.0)
                if newer is None and not wake.is_set():
                    continue
                wake = trio.Event()
                try:
                    result = await self.client.fetch("latest")
                    self._newest_fetched = max(self._newest_fetched, result.version)
                except SwarmError as e:
                    log.warning("fetching new weights failed: %s", e)
                    await trio.sleep(1.0)

    async def _swap_if_newer(self) -> None:
        """Between leases: load the newest complete version if it is newer than the engine's."""
        assert self.client is not None
        chosen = self.behaviour.choose_version(self.client.local_versions(), self.engine.version)
        if chosen is not None and chosen != self.engine.version:
            await trio.to_thread.run_sync(self._load, self.client.path_of(chosen), chosen)
            self.stats.version = chosen
            log.info("swapped to weights v%d", chosen)

    def _load(self, folder: Path, version: int) -> None:
        self.engine.load(folder, version)
        self.behaviour.on_load(self.engine, version)

    # ------------------------------------------------------------------ work

    async def _heartbeats(self, every_s: float) -> None:
        # The first goes out at once: the weights are loaded, and the dashboard should say so.
        while True:
            try:
                reply = await self._call(
                    msg.HEARTBEAT_PROTOCOL, self._beat(), msg.HeartbeatReply, 10.0
                )
            except SwarmError as e:
                log.debug("heartbeat failed: %s", e)
            else:
                await self._on_heartbeat_reply(reply)
            await trio.sleep(every_s)

    def _beat(self) -> msg.Heartbeat:
        """This node's heartbeat, whole. The coordinator keeps the last one's report of where
        the weights came from: a bare one sent to ask for the current version (on each failed
        fetch) blanked that report, and the dashboard's relay tree showed no downloads."""
        return msg.Heartbeat(
            weight_version=max(self.engine.version, 0),
            leases_done=self.stats.leases,
            tokens_per_s=self.stats.tokens_per_s,
            weights_from=self.client.bytes_by_source() if self.client else {},
        )

    async def _on_heartbeat_reply(self, reply: msg.HeartbeatReply) -> None:
        self.stats.replies[f"heartbeat:{reply.code}"] += 1
        self.stats.accepted, self.stats.soft_rejected = reply.accepted, reply.soft_rejected
        self.stats.hard_rejected = reply.hard_rejected
        self.stats.coordinator_version = reply.current_version
        self._trust_version(reply.current_version)
        if reply.code == "banned" or reply.banned:
            raise NodeError(f"this node was banned: {reply.reason}")
        if reply.relay_check in ("unreachable", "refused"):
            self._unreachable.set()
        if reply.code == "not_joined":
            # the coordinator lost track of this node (a restart onto another ledger, say)
            log.info("the coordinator does not know this node; joining again")
            await self._join(self._relay_url)

    async def _work(self) -> None:
        while not self._stopping and not self._leases_done():
            lease = await self._next_lease()
            if lease is None:
                return
            await self._do_lease(lease)

    def _leases_done(self) -> bool:
        return self.options.max_leases is not None and self.stats.leases >= self.options.max_leases

    async def _next_lease(self) -> msg.Lease | None:
        """Ask for work until a lease comes; None when the node should leave (stopping, or
        the pool finished). A reply without a lease is waited out: its `retry_after_s` plus a
        jitter of at most `IDLE_JITTER_MAX_S` (the coordinator paces the pool; the jitter
        only spreads nodes apart)."""
        attempts = retrying(
            min(IDLE_JITTER_MAX_S, self.options.backoff_max_s),
            retry_if_result(_idle),
        )
        reply = await attempts(self._ask_for_lease)
        if reply is None:
            return None
        if reply.code == "finished":
            log.info("the pool finished training; leaving")
            self.stats.state = "pool finished"
            return None
        return reply.lease

    async def _ask_for_lease(self) -> msg.LeaseReply | None:
        """One lease request, asked again at once when the coordinator's demand for newer
        weights was met, or when it held the request as long as asked and had no work yet;
        None when the node is stopping (a stop may come while it waits)."""
        while not self._stopping:
            asked = trio.current_time()
            reply = await self._request_lease()
            if _held_out(reply, trio.current_time() - asked):
                continue
            if reply.code != "fetch_weights" or not await self._fetch_asked():
                return reply
        return None

    async def _lease_or_join_again(self, request: msg.LeaseRequest) -> msg.LeaseReply:
        """The coordinator's reply to `request`. Refused as no member (`forbidden`), the node
        joins again and asks once more: the coordinator may have lost track of it (a restart
        onto another ledger), and exiting then left a pool without its nodes. A ban or a
        refusal comes from that join, and ends the node."""
        try:
            return await self._lease_call(request)
        except RemoteError as e:
            if e.code != ErrorCode.FORBIDDEN:
                raise NodeError(f"the coordinator refused this node's lease request: {e}") from None
        log.info("the coordinator does not know this node; joining again")
        await self._join(self._relay_url)
        try:
            return await self._lease_call(request)
        except RemoteError as e:
            raise NodeError(f"the coordinator refused this node's lease request: {e}") from None

    async def _lease_call(self, request: msg.LeaseRequest) -> msg.LeaseReply:
        return await self._retry("lease", self._call, msg.LEASE_PROTOCOL, request, msg.LeaseReply)

    async def _request_lease(self) -> msg.LeaseReply:
        await self._swap_if_newer()
        request = msg.LeaseRequest(weight_version=max(self.engine.version, 0), wait_s=LEASE_WAIT_S)
        self.stats.state = "asking for work"
        # Busy while asking: the coordinator may hold the request and then lease, and a stop
        # must wait for that lease rather than leave it to expire against this node.
        self._busy()
        reply: msg.LeaseReply | None = None
        try:
            reply = await self._lease_or_join_again(request)
        finally:
            if reply is None or reply.lease is None:
                self.idle.set()
        self.stats.replies[f"lease:{reply.code}"] += 1
        if reply.lease is not None:
            return reply
        if reply.code == "banned":
            raise NodeError(f"this node was banned: {reply.reason}")
        if reply.code not in ("finished", "fetch_weights"):
            # busy, quota: the coordinator paces the pool through retry_after_s
            self.stats.state = f"idle ({reply.code}): {reply.reason}"
        return reply

    async def _fetch_asked(self) -> bool:
        """Fetch and load the newest weights, as the coordinator asked; False when nothing
        newer is served yet (the node then waits before asking again rather than spin)."""
        before = self.engine.version
        self.stats.state = "fetching weights (the coordinator asked)"
        await self._fetch_and_load()
        return self.engine.version > before

    async def _do_lease(self, lease: msg.Lease) -> None:
        if lease.node != self.identity.public_key:
            raise NodeError("the coordinator sent a lease made out to another node")
        self._lease = lease
        self._busy()
        self.stats.state = f"generating lease {lease.lease_id}"
        t0 = time.perf_counter()
        with trio.CancelScope(shield=True):
            results = await trio.to_thread.run_sync(
                self.behaviour.generate, self._generator(), lease
            )
        self.stats.seconds_generating += time.perf_counter() - t0
        self.stats.tokens += sum(len(c.tokens) for r in results for c in r.completions)
        self.stats.rollouts += sum(len(r.completions) for r in results)
        submission = msg.Submission(
            lease_id=lease.lease_id, weight_version=self.engine.version, results=results
        )
        self.stats.state = f"submitting lease {lease.lease_id}"
        for sub in self.behaviour.submissions(submission, lease):
            await self._submit(sub, lease)
        self.stats.leases += 1
        self._lease = None
        self.idle.set()

    def _busy(self) -> None:
        """Clear `idle`, keeping the event a stop may already wait on when it is clear."""
        if self.idle.is_set():
            self.idle = trio.Event()

    def _generator(self) -> Engine:
        """The engine for a single-turn pool; for a multi-turn one, the turn loop around it."""
        spec = self.location.spec
        env = environment_for(spec.task.name, dict(spec.task.options))
        if env is None:
            return self.engine
        if not isinstance(self.engine, HFEngine):
            raise NodeError(f"task {spec.task.name!r} is multi-turn: it needs --engine hf")
        return TurnEngine(self.engine, env)

    async def _submit(self, sub: msg.Submission, lease: msg.Lease) -> None:
        """Send one submission; a full validation queue (busy) is waited out until the
        lease's deadline, after which the answer would be late anyway."""
        deadline_s = lease.deadline_ms / 1000

        def past_deadline(state: RetryCallState) -> bool:
            assert state.outcome is not None  # an unreachable coordinator is waited out
            return not state.outcome.failed and time.time() + state.upcoming_sleep > deadline_s

        attempts = retrying(
            self.options.backoff_max_s,
            retry_if_exception(retryable) | retry_if_result(lambda r: r.code == "busy"),
            stop=past_deadline,
            retry_error_callback=lambda state: state.outcome.result(),  # the last busy receipt
            before_sleep=partial(self._waiting, "submit", lambda r: "the validation queue is full"),
        )
        try:
            receipt = await attempts(self._send, sub)
        except RemoteError as e:
            log.warning("lease %d refused: %s", lease.lease_id, e)
            return
        if receipt.code in ("released", "late"):
            log.info("lease %d closed before its answer came: %s", lease.lease_id, receipt.reason)
        elif receipt.code not in ("queued", "repeat"):
            log.warning(
                "lease %d not taken for validation (%s): %s",
                lease.lease_id,
                receipt.code,
                receipt.reason,
            )

    async def _send(self, sub: msg.Submission) -> msg.Receipt:
        receipt = await self._call(msg.SUBMIT_PROTOCOL, sub, msg.Receipt, 60.0)
        self.stats.replies[f"receipt:{receipt.code}"] += 1
        return receipt

    async def release_current(self) -> None:
        """Give an unfinished lease back so another node does it now, not at its deadline."""
        lease = self._lease
        if lease is None or self._host is None:
            return
        with trio.move_on_after(5):
            try:
                await self._release(lease.lease_id)
                log.info("released lease %d", lease.lease_id)
            except SwarmError as e:
                log.warning("could not release lease %d: %s", lease.lease_id, e)


def _join_busy(reply: msg.JoinReply) -> bool:
    """The pool admits no new identities right now: a later join can succeed."""
    return not reply.accepted and reply.code == "busy"


def _held_out(reply: msg.LeaseReply, took_s: float) -> bool:
    """Whether the coordinator held a lease request for about as long as the node offered to
    wait and had no work: the node asks again at once. A busy answer that came back sooner
    is waited out as any other (a coordinator cannot make its nodes spin)."""
    return reply.code == "busy" and reply.retry_after_s == 0 and took_s >= LEASE_WAIT_S / 2


def _idle(reply: msg.LeaseReply | None) -> bool:
    """No lease, but the pool goes on: busy, quota, or newer weights not served yet (None: the
    node is stopping)."""
    return reply is not None and reply.lease is None and reply.code != "finished"
