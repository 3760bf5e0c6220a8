"""The node's worker loop: find the pool, join, follow the weights, and turn leases into
verified rollouts.

    discover (pool id + bootstrap) -> join -> fetch weights -> load engine
    loop: lease -> generate (seeded, captured, proven) -> sign and submit -> receipt
    beside it: heartbeats, and new versions fetched in the background (swapped in between
    leases, never inside one)

Everything the coordinator says is signed and checked (the host pins its key); the spec must
hash to the pool id; manifests must carry the coordinator's signature. When the coordinator is
unreachable the node retries with exponential backoff and carries on when it returns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version as package_version
from pathlib import Path

import trio

from node.behaviour import Behaviour
from node.engine import Engine
from node.hardware import probe
from protocol import messages as msg
from protocol.discovery import PoolBook, PoolLocation, discover, serve_discovery
from protocol.errors import DiscoveryError, RemoteError, SwarmError, TransportError
from protocol.host import Host, pool_topic
from protocol.identity import Identity
from shardcast.client import Client
from shardcast.errors import ShardcastError
from shardcast.relay import Relay

log = logging.getLogger("swarmrl.node")


class NodeError(SwarmError):
    """A reason for the node to stop: banned, refused, misconfigured."""


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
    max_leases: int | None = None
    """Stop after this many leases (tests, benchmarks)."""
    backoff_max_s: float = 30.0


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
        self._newest_fetched = -1
        self._lease: msg.Lease | None = None
        self._stopping = False
        self.idle = trio.Event()
        """Set while no lease is being worked on (a stop can proceed at once)."""
        self.idle.set()

    # ------------------------------------------------------------------ top level

    async def run(self) -> None:
        async with (
            Host.open(self.identity, self.pool_id, self.options.listen) as host,
            trio.open_nursery() as nursery,
        ):
            self._host = host
            self.stats.state = "discovering"
            book = PoolBook(self.pool_id)
            self.location = await self._retry(
                "discovery", partial(discover, host, self.options.bootstrap, book=book)
            )
            serve_discovery(host, book)  # this node now helps newcomers find the pool
            spec = self.location.spec
            self.stats.state = "joining"
            reply = await self._join()
            sources = list(reply.weights_urls)
            if self.options.relay_port is not None:
                relay_url = await nursery.start(self._relay, sources)
                # Join again to tell the coordinator where we serve (joining is idempotent),
                # and fetch through our own relay only, so shards cross the network once (the
                # relay picks among all the upstreams). With the relay merely listed first, it
                # lacked each new version for the first moment, and nearly every byte came
                # from the upstreams twice (measured through the relay tree's source counts).
                await self._join(relay_url)
                sources = [relay_url]
            self.client = Client(
                sources,
                self.options.data_dir / "weights" / self.pool_id,
                public_key=bytes.fromhex(spec.coordinator.public_key),
                pool_id=self.pool_id,
                keep=spec.limits.max_staleness + 1,
            )
            self.stats.state = "fetching weights"
            await self._fetch_and_load(initial=True)
            nursery.start_soon(self._heartbeats, reply.heartbeat_s)
            nursery.start_soon(self._follow_versions)
            nursery.start_soon(self.behaviour.alongside, self)
            await self._work()
            nursery.cancel_scope.cancel()
        if self.client is not None:
            await self.client.aclose()

    def stop(self) -> None:
        """Finish (or release) the current lease, then leave."""
        self._stopping = True

    # ------------------------------------------------------------------ coordinator calls

    @property
    def _coordinator(self) -> str:
        assert self.location is not None
        return self.location.coordinator_addrs[0]

    async def _call(
        self, protocol_id: str, message: msg.Message, reply_type: type, timeout_s: float = 30.0
    ):
        assert self._host is not None
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

    async def _retry(self, what: str, fn, *args):
        """Run `fn(*args)` until it succeeds, backing off exponentially while the coordinator (or
        the network) is away. Errors that retrying cannot fix propagate."""
        delay = 0.5
        while True:
            try:
                return await fn(*args)
            except (TransportError, RemoteError, DiscoveryError, ShardcastError) as e:
                if isinstance(e, RemoteError) and e.code not in (
                    "rate_limited",
                    "timeout",
                    "internal",
                ):
                    raise
                wait = max(delay, getattr(e, "retry_after_s", 0.0))
                log.warning("%s failed (%s); retrying in %.1fs", what, e, wait)
                self.stats.state = f"waiting ({what})"
                await trio.sleep(wait)
                delay = min(delay * 2, self.options.backoff_max_s)

    async def _join(self, relay_url: str = "") -> msg.JoinReply:
        hardware = await trio.to_thread.run_sync(probe, self.options.device)
        request = msg.JoinRequest(
            hardware=hardware,
            engine=self.engine.name,
            software=package_version("swarmrl"),
            relay_url=relay_url,
        )
        reply = await self._retry("join", self._call, msg.JOIN_PROTOCOL, request, msg.JoinReply)
        if not reply.accepted:
            raise NodeError(f"the coordinator refused to let this node join: {reply.reason}")
        self.stats.coordinator_version = reply.current_version
        log.info("joined pool %s (coordinator at v%d)", self.pool_id, reply.current_version)
        return reply

    # ------------------------------------------------------------------ weights

    async def _relay(
        self, upstreams: list[str], *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Re-serve the pool's weights to other nodes (`--relay PORT`)."""
        spec = self.location.spec
        relay = Relay(
            upstreams,
            self.options.data_dir / "relay" / self.pool_id,
            public_key=bytes.fromhex(spec.coordinator.public_key),
            pool_id=self.pool_id,
            keep=spec.limits.max_staleness + 2,
        )
        async with trio.open_nursery() as nursery:
            url = await nursery.start(relay.run, self.options.relay_host, self.options.relay_port)
            log.info("relaying weights at %s", url)
            task_status.started(url)

    async def _fetch_and_load(self, initial: bool = False) -> None:
        assert self.client is not None
        result = await self._retry("weights", self.client.fetch, "latest")
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
            beat = msg.Heartbeat(
                weight_version=max(self.engine.version, 0),
                leases_done=self.stats.leases,
                tokens_per_s=self.stats.tokens_per_s,
                weights_from=self.client.bytes_by_source() if self.client else {},
            )
            try:
                reply = await self._call(msg.HEARTBEAT_PROTOCOL, beat, msg.HeartbeatReply, 10.0)
            except SwarmError as e:
                log.debug("heartbeat failed: %s", e)
            else:
                self.stats.accepted, self.stats.soft_rejected = reply.accepted, reply.soft_rejected
                self.stats.hard_rejected = reply.hard_rejected
                self.stats.coordinator_version = reply.current_version
                if reply.banned:
                    log.error("this node was banned: %s", reply.reason)
                    self._stopping = True
            await trio.sleep(every_s)

    async def _work(self) -> None:
        idle = 0.5
        while not self._stopping:
            if self.options.max_leases is not None and self.stats.leases >= self.options.max_leases:
                return
            await self._swap_if_newer()
            request = msg.LeaseRequest(weight_version=max(self.engine.version, 0))
            self.stats.state = "asking for work"
            try:
                reply = await self._retry(
                    "lease", self._call, msg.LEASE_PROTOCOL, request, msg.LeaseReply
                )
            except RemoteError as e:
                raise NodeError(f"the coordinator refused this node's lease request: {e}") from None
            if reply.lease is None:
                self.stats.state = f"idle: {reply.reason}"
                if "fetch" in reply.reason:
                    await self._fetch_and_load()
                await trio.sleep(max(reply.retry_after_s, idle))
                continue
            await self._do_lease(reply.lease)

    async def _do_lease(self, lease: msg.Lease) -> None:
        if lease.node != self.identity.public_key:
            raise NodeError("the coordinator sent a lease made out to another node")
        self._lease = lease
        self.idle = trio.Event()
        self.stats.state = f"generating lease {lease.lease_id}"
        t0 = time.perf_counter()
        with trio.CancelScope(shield=True):
            results = await trio.to_thread.run_sync(self.behaviour.generate, self.engine, lease)
        self.stats.seconds_generating += time.perf_counter() - t0
        self.stats.tokens += sum(len(c.tokens) for r in results for c in r.completions)
        self.stats.rollouts += sum(len(r.completions) for r in results)
        submission = msg.Submission(
            lease_id=lease.lease_id, weight_version=self.engine.version, results=results
        )
        self.stats.state = f"submitting lease {lease.lease_id}"
        for sub in self.behaviour.submissions(submission, lease):
            try:
                receipt = await self._retry(
                    "submit", self._call, msg.SUBMIT_PROTOCOL, sub, msg.Receipt, 60.0
                )
            except RemoteError as e:
                log.warning("lease %d refused: %s", lease.lease_id, e)
                continue
            if not receipt.queued:
                log.warning("lease %d not taken for validation: %s", lease.lease_id, receipt.reason)
        self.stats.leases += 1
        self._lease = None
        self.idle.set()

    async def release_current(self) -> None:
        """Give an unfinished lease back so another node does it now, not at its deadline."""
        lease = self._lease
        if lease is None or self._host is None:
            return
        with trio.move_on_after(5):
            try:
                await self._call(
                    msg.RELEASE_PROTOCOL,
                    msg.ReleaseLease(lease_id=lease.lease_id),
                    msg.Receipt,
                    5.0,
                )
                log.info("released lease %d", lease.lease_id)
            except SwarmError as e:
                log.warning("could not release lease %d: %s", lease.lease_id, e)
