"""A libp2p host for SHARDCAST across NATs: circuit relay v2 (hop and client), streams to
peers by id, and a dial-back reachability check.

A node behind NAT cannot be dialled, so it holds a reservation on a public relay hop and
advertises `<relay addr>/p2p-circuit/p2p/<its id>`; a peer that wants its pieces dials that
address, and the relay splices the two streams (bytes stay end-to-end encrypted: the relay
sees only ciphertext, and every byte is still checked against the signed manifest). The hop
is bounded (`HopLimits`): an open network's peers may be hostile, and a relay's upload is
the swarm's to spend once per circuit, not an attacker's to exhaust.

py-libp2p (0.8.1) provides the relay protocol; this module wires it up, with our timeouts
around every call into it (it is not consistent about raising on a dead peer).
"""

from __future__ import annotations

import enum
import functools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import multiaddr
import trio

from protocol.addresses import dialable
from protocol.errors import TransportError
from protocol.host import connection_config, negotiate_stream
from protocol.identity import Identity
from protocol.ratelimit import TokenBucket
from shardcast.p2p import (
    PROTOCOL_ID,
    SCHEME,
    P2PTransport,
    StreamGateway,
    StreamLimits,
    close_stream,
    reset_stream,
)
from shardcast.scope import dial_floor, may_dial
from shardcast.throttle import UploadThrottle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HopLimits:
    """What a relay hop spends on strangers (see docs/security.md, "NAT traversal")."""

    reservations: int = 64
    """Nodes holding a slot at once: each costs one idle connection and a table entry."""
    circuits: int = 16
    """Circuits per reserved node at once (a circuit is one dialler's connection to it)."""
    circuit_bytes: int = 256 * 1024 * 1024
    """Bytes one circuit may carry, both directions together; then it is reset and the
    dialler must open another (which counts against `circuits` again)."""
    circuit_seconds: int = 600
    """Longest a circuit lives."""
    reservation_ttl_s: int = 900
    """A slot lapses unless its holder refreshes it (py-libp2p refreshes before expiry): a
    node that vanished frees its slot within this time."""
    circuits_per_source: int = 8
    """Hop requests (circuits being made or carried) at once from one dialling peer:
    py-libp2p bounds circuits per destination only, so a dialler could otherwise hold
    `circuits` on every reserved node at once."""
    circuits_total: int = 32
    """Hop requests at once from everyone (each circuit also stops at `circuit_bytes`).
    With every one busy, each still gets `rate_bytes_s / circuits_total` (125 kB/s by
    default), twice a fetcher's floor (`FetchPolicy.min_rate`, 64 KiB/s): a full hop slows
    circuits but does not make honest members behind it look like tricklers."""
    rate_bytes_s: float = 4e6
    """Bytes per second the hop forwards, every circuit and direction together (0: no cap).
    py-libp2p has no rate limit of its own, and each forwarded byte is decrypted and
    re-encrypted in Python in the hop's process: 65-90 ms of CPU per MB on the CI machine,
    so an uncapped hop there forwards 10-11 MB/s with all the CPU its process can get, taken
    from a coordinator that also validates and trains. At 4 MB/s relaying takes about a
    third of a core (`bench/hop_relay.py`; docs/security.md, "NAT traversal")."""
    first_message_s: float = 5.0
    """Longest a hop stream may stay silent before its first message (py-libp2p waits 30 s).
    Until it arrives the stream counts only against its peer's `HOP_WAITING_PER_PEER`, never
    against the budgets below: silent streams cannot starve reservations or circuits."""
    reserves_total: int = 16
    """RESERVE requests (new slots and refreshes) answered at once, a budget apart from
    `circuits_total` so that circuits being made cannot starve reservations."""


AUTONAT_TOTAL = 8
"""Dial-back checks a hop answers at once (each is one dial by the hop)."""
HOP_WAITING_PER_PEER = 4
"""Hop streams one peer may hold open before their first message (each for at most
`HopLimits.first_message_s`); an honest client writes its request as soon as it opens one."""
RESERVES_PER_PEER = 2
"""RESERVE requests one peer may have answered at once (a client sends one per refresh)."""
DCUTR_DIALS_PER_S = 0.5
DCUTR_DIAL_BURST = 10
"""Hole-punch dials (TCP dials and UDP sprays) a host makes, whoever asked: a token bucket of
`DCUTR_DIAL_BURST` refilled at `DCUTR_DIALS_PER_S` (30 a minute). Each address a relayed peer
reports costs one; an honest punch dials a handful."""


class Reachability(enum.Enum):
    PUBLIC = "public"
    """A dial-back on the address we advertised reached us."""
    PRIVATE = "private"
    """The dial-back failed, or was refused because we advertised no address at the IP the
    server sees us at (behind NAT, we advertise a private one)."""
    UNKNOWN = "unknown"
    """The server could not be asked, or gave no verdict."""


@dataclass(frozen=True)
class NatConfig:
    dial_timeout_s: float = 10.0
    stream_timeout_s: float = 10.0
    """Opening a stream on an existing connection (protocol negotiation included)."""
    reserve_timeout_s: float = 15.0
    relayed_per_hop: int = 16
    """Relayed connections this node accepts through one hop at once (a hop's own default
    bound per reserved node, `HopLimits.circuits`)."""
    relayed_total: int = 32
    """Relayed connections this node accepts through all its hops together: each is a Noise
    handshake and a connection in the swarm that `protocol.inbound` never counts."""


class P2PNode:
    """A running libp2p host with circuit relay v2; make one with `open_node`."""

    def __init__(self, raw: Any, relay: Any, transport: Any, config: NatConfig) -> None:
        self.raw = raw
        self._relay = relay
        self._transport = transport
        self.config = config
        self._known: dict[str, list[str]] = {}
        self._locks: dict[str, trio.Lock] = {}
        self.nursery: trio.Nursery | None = None
        self.served: list[Any] = []
        """Protocols this node added handlers for (removed when it is detached)."""
        self.gateways: list[StreamGateway] = []
        self.verdict: Reachability | None = None
        """What the last dial-back check (`reachability`) said; None before the first."""
        self.hops: list[str] = []
        """Relay hops (multiaddrs ending in /p2p/<id>) through which a peer with no known
        address is tried: `<hop>/p2p-circuit/p2p/<peer>` (a pool's coordinator runs one)."""
        self.reserved_on: set[str] = set()
        """Peer ids of the hops that gave this node a slot: the only peers whose STOP
        streams (relayed connections to us) it accepts (`_StopGate`)."""
        from shardcast.dialgate import gate_dials

        self.dial_gate = gate_dials(raw, lambda: dial_floor(self.hops))
        """Dials reach the addresses our code names, others only as DCUtR's do."""

    @property
    def peer_id(self) -> str:
        return self.raw.get_id().to_base58()

    @property
    def addrs(self) -> list[str]:
        """Direct addresses, each ending in /p2p/<id> (an unspecified listen address
        expanded into this machine's interface addresses: see `protocol.addresses`)."""
        return dialable(str(a) for a in self.raw.get_addrs())

    @property
    def relayed_bytes(self) -> int:
        """Bytes this node's relay hop has forwarded, both directions (0 when not a hop)."""
        return self._relay.relayed

    def learn(self, peer_id: str, addrs: Sequence[str]) -> None:
        """Remember where `peer_id` may be dialled (direct or /p2p-circuit addresses)."""
        known = self._known.setdefault(peer_id, [])
        for a in addrs:
            if a not in known:
                known.append(a)

    async def reachability(self, server_addr: str) -> Reachability:
        """Ask the AutoNAT server at `server_addr` (a relay hop runs one) to dial us back on
        the addresses we listen on.

        py-libp2p's server (0.8.1) may answer over the connection we already hold to it
        rather than a fresh dial, so PUBLIC is only trusted as far as that goes; PRIVATE
        (the case that matters: then reserve a relay slot) is reliable."""
        self.verdict = await self._ask_dial_back(server_addr)
        return self.verdict

    async def _ask_dial_back(self, server_addr: str) -> Reachability:
        from libp2p.host.autonat.autonat import AutoNATService
        from libp2p.host.autonat.pb.autonat_pb2 import Message
        from libp2p.peer.peerinfo import info_from_p2p_addr

        info = info_from_p2p_addr(multiaddr.Multiaddr(server_addr))
        client = AutoNATService(self.raw, serve=False)
        with trio.move_on_after(self.config.reserve_timeout_s):
            try:
                await self.raw.connect(info)
                # our dialable addresses, not libp2p's listen ones: the server dials only
                # those at the IP it sees us at, and never 0.0.0.0
                mine = [multiaddr.Multiaddr(a).to_bytes() for a in self.addrs]
                status, _ = await client.query_server(info.peer_id, mine)
            except Exception as e:  # a dead or hostile server: no verdict
                log.info("reachability check via %s failed: %s", server_addr, e)
                return Reachability.UNKNOWN
            if status == Message.OK:
                return Reachability.PUBLIC
            if status in (Message.E_DIAL_ERROR, Message.E_DIAL_REFUSED):
                return Reachability.PRIVATE
        return Reachability.UNKNOWN

    def holds_slot(self, peer_id: str) -> bool:
        """Whether `peer_id` holds a live reservation on this node's hop (and is connected),
        i.e. can be reached through it now."""
        from libp2p.peer.id import ID

        return bool(self._relay.resource_manager.has_reservation(ID.from_base58(peer_id)))

    def use_hops(self, hops: Sequence[str]) -> None:
        """Reach peers of unknown address through these relay hops (see `hops`)."""
        for hop in hops:
            peer_of(hop)  # raises TransportError for an address without /p2p/<id>
            if hop not in self.hops:
                self.hops.append(hop)

    def serve(self, protocol_id: str, handler: Callable[[Any], Awaitable[None]]) -> None:
        from libp2p.custom_types import TProtocol

        self.raw.set_stream_handler(TProtocol(protocol_id), handler)
        self.served.append(TProtocol(protocol_id))

    async def serve_member(
        self, base_url: str, relays: Sequence[str], limits: StreamLimits | None = None
    ) -> tuple[Reachability, list[str]]:
        """Serve the SHARDCAST member at `base_url` over streams, and make it reachable:
        (what the dial-back check said, the addresses to advertise for `p2p_url(peer_id)`).
        With no relays there is no check, and the direct addresses are advertised."""
        self.serve_gateway(base_url, limits)
        return await reachable_addrs(self, relays)

    def serve_gateway(self, base_url: str, limits: StreamLimits | None = None) -> None:
        """Answer SHARDCAST streams from the member's HTTP server at `base_url`. A peer
        answered in full counts as served on its connection, as for a pool request: a member
        fetching from us is not the idle stranger that gives way when this host is full
        (`protocol.inbound`)."""
        # A host made by `protocol.libp2p_stack.new_host` counts its inbound connections;
        # py-libp2p's own has nothing to note.
        inbound = getattr(self.raw.get_network(), "inbound_connections", None)
        gateway = StreamGateway(
            base_url, limits, on_served=None if inbound is None else inbound.touch
        )
        self.gateways.append(gateway)
        self.serve(PROTOCOL_ID, gateway.handle)

    async def reserve(self, relay_addr: str) -> str:
        """Hold a slot on the relay hop at `relay_addr` (a multiaddr ending in /p2p/<id>):
        returns the /p2p-circuit address others reach this node at."""
        from libp2p.peer.peerinfo import info_from_p2p_addr
        from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID

        info = info_from_p2p_addr(multiaddr.Multiaddr(relay_addr))
        assert self.nursery is not None
        with trio.move_on_after(self.config.reserve_timeout_s) as scope:
            try:
                await self.raw.connect(info)
                stream = await self.raw.new_stream(info.peer_id, [HOP_PROTOCOL_ID])
            except Exception as e:  # libp2p raises whatever the socket layer gave it
                raise TransportError(f"cannot reach relay {relay_addr}: {e}") from e
            try:
                ok = await self._transport.reserve(stream, info.peer_id, self.nursery)
            finally:
                await close_stream(stream)
        if scope.cancelled_caught:
            raise TransportError(f"no reservation from {relay_addr} in time")
        if not ok:
            raise TransportError(f"relay {relay_addr} refused a reservation")
        self.reserved_on.add(info.peer_id.to_base58())
        return circuit_addr(relay_addr, self.peer_id)

    async def open_stream(self, peer_id: str, protocol_id: str) -> Any:
        """A new stream to `peer_id`: over the connection we have, else dialled on a known
        direct address, else through a known relay circuit."""
        from libp2p.peer.id import ID

        pid = ID.from_base58(peer_id)
        with trio.move_on_after(self.config.dial_timeout_s + self.config.stream_timeout_s):
            async with self._locks.setdefault(peer_id, trio.Lock()):
                if not self.raw.get_network().connections.get(pid):
                    await self._dial(peer_id)
            return await negotiate_stream(
                self.raw, peer_id, protocol_id, self.config.stream_timeout_s
            )
        raise TransportError(f"no stream to {peer_id} in time")

    async def open_connected_stream(self, peer_id: str, protocol_id: str) -> Any:
        """A new stream to `peer_id` over a connection we already have, never a dial: what a
        coordinator probing a node's stream source uses, so that no node can make it open
        connections or circuits (TransportError when there is no connection)."""
        from libp2p.peer.id import ID

        pid = ID.from_base58(peer_id)
        if not self.raw.get_network().connections.get(pid):
            raise TransportError(f"no connection to {peer_id}")
        return await negotiate_stream(self.raw, peer_id, protocol_id, self.config.stream_timeout_s)

    async def _dial(self, peer_id: str) -> None:
        from libp2p.peer.id import ID
        from libp2p.peer.peerinfo import PeerInfo

        addrs = list(self._known.get(peer_id, []))
        addrs += [c for h in self.hops if (c := circuit_addr(h, peer_id)) not in addrs]
        if not addrs:
            raise TransportError(f"no known address for peer {peer_id}")
        direct = [a for a in addrs if "/p2p-circuit" not in a]
        circuits = [a for a in addrs if "/p2p-circuit" in a]
        errors = []
        if direct:
            info = PeerInfo(ID.from_base58(peer_id), [multiaddr.Multiaddr(a) for a in direct])
            with trio.move_on_after(self.config.dial_timeout_s) as scope:
                try:
                    await self.raw.connect(info)
                    return
                except Exception as e:  # libp2p raises whatever the socket layer gave it
                    errors.append(f"direct: {type(e).__name__}: {e}")
            if scope.cancelled_caught:
                errors.append("direct: timed out")
        for a in circuits:
            with trio.move_on_after(self.config.dial_timeout_s) as scope:
                try:
                    await self._transport.dial(multiaddr.Multiaddr(a))
                    return
                except Exception as e:
                    errors.append(f"{a}: {type(e).__name__}: {e}")
            if scope.cancelled_caught:
                errors.append(f"{a}: timed out")
        raise TransportError(f"cannot reach {peer_id}: {'; '.join(errors)}")


@asynccontextmanager
async def open_node(
    identity: Identity,
    listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
    *,
    hop: HopLimits | None = None,
    admit: Callable[[str], bool] | None = None,
    config: NatConfig | None = None,
    dcutr: bool = True,
) -> AsyncIterator[P2PNode]:
    """Start a libp2p host of its own and `attach_node` to it (a member without one, the
    command line, a standalone hop)."""
    from protocol.libp2p_stack import new_host

    config = config or NatConfig()
    addrs = [multiaddr.Multiaddr(a) for a in listen]
    raw = new_host(
        identity.libp2p_key_pair(),
        listen_addrs=addrs,
        connection_config=connection_config(config.dial_timeout_s),
    )
    async with raw.run(addrs):
        try:
            async with attach_node(raw, hop=hop, admit=admit, config=config, dcutr=dcutr) as node:
                yield node
        finally:
            with trio.move_on_after(5.0) as scope:
                scope.shield = True
                await raw.close()


@asynccontextmanager
async def attach_node(
    raw: Any,
    *,
    hop: HopLimits | None = None,
    admit: Callable[[str], bool] | None = None,
    config: NatConfig | None = None,
    dcutr: bool = True,
) -> AsyncIterator[P2PNode]:
    """Add circuit relay v2 to a running py-libp2p host `raw` (e.g. a node's `Host.libp2p`,
    so one identity serves the pool protocol and SHARDCAST): a relay hop and AutoNAT server
    for others when `hop` is given (for the peers `admit` accepts, when given: e.g. the
    pool's members), and in any case a relay client (it may reserve slots and dial
    /p2p-circuit addresses). With `dcutr`, relayed connections are upgraded to direct ones
    where the NATs allow (DCUtR hole punching, driven by py-libp2p every few seconds).
    Removes what it added when the block ends."""
    from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID
    from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
    from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID
    from libp2p.relay.circuit_v2.resources import RelayLimits
    from libp2p.relay.circuit_v2.transport import CircuitV2Transport
    from libp2p.tools.anyio_service import background_trio_service

    config = config or NatConfig()
    limits = hop or HopLimits()
    relay_limits = RelayLimits(
        duration=limits.circuit_seconds,
        data=limits.circuit_bytes,
        max_circuit_conns=limits.circuits,
        max_reservations=limits.reservations,
        reservation_ttl=limits.reservation_ttl_s,
    )
    relay = _metered_relay_class()(raw, limits=relay_limits, allow_hop=hop is not None)
    if hop is not None and limits.rate_bytes_s > 0:
        relay.throttle = UploadThrottle(limits.rate_bytes_s)
    roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if hop else RelayRole(0))
    rconfig = RelayConfig(roles=roles, limits=relay_limits)
    async with background_trio_service(relay), _maybe_dcutr(raw, dcutr, config) as puncher:
        await relay.event_started.wait()
        if hop is not None:
            _serve_hop(raw, relay, hop, admit, config)
        node = P2PNode(raw, relay, CircuitV2Transport(raw, relay, rconfig), config)
        # Replaces the STOP handler the relay service registered (py-libp2p accepts a relayed
        # connection from anyone who opens one): same protocol, gated. A hop host never
        # reserves, so it accepts none.
        raw.set_stream_handler(STOP_PROTOCOL_ID, _StopGate(relay, node).handle)
        if puncher is not None:
            puncher.hops = lambda: node.hops
        try:
            async with trio.open_nursery() as nursery:
                node.nursery = nursery
                yield node
                nursery.cancel_scope.cancel()
        finally:
            for gateway in node.gateways:
                with trio.move_on_after(5.0) as scope:
                    scope.shield = True
                    await gateway.aclose()
            for protocol_id in node.served:
                raw.remove_stream_handler(protocol_id)
            if hop is not None:
                raw.remove_stream_handler(AUTONAT_PROTOCOL_ID)


@functools.cache
def _metered_relay_class() -> type:
    """py-libp2p's circuit relay protocol, counting the bytes its hop forwards and holding
    them to a rate (`throttle`, set on a hop with `HopLimits.rate_bytes_s`).

    Every chunk a circuit forwards, either way, is read by `_read_stream_with_retry` (in
    py-libp2p 0.8.1 it is called from `_relay_data` alone), so waiting there before handing a
    chunk on holds each circuit to its share: the hop stops reading, the stream's window
    fills, and the sender waits, at no cost to us. Built on first use, so that importing
    this module does not import libp2p."""
    from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol

    class MeteredRelay(CircuitV2Protocol):  # type: ignore[misc]
        throttle: UploadThrottle | None = None
        relayed = 0
        """Bytes forwarded through this hop's circuits, both directions."""

        async def _read_stream_with_retry(self, stream: Any, *args: Any, **kw: Any) -> Any:
            data = await super()._read_stream_with_retry(stream, *args, **kw)
            if data:
                self.relayed += len(data)
                if self.throttle is not None:
                    await self.throttle.take(len(data))
            return data

    return MeteredRelay


def _serve_hop(
    raw: Any, relay: Any, hop: HopLimits, admit: Callable[[str], bool] | None, config: NatConfig
) -> None:
    """The relay hop and an AutoNAT server on `raw`, both behind gates (`_Gate`)."""
    from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService
    from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID

    # Replaces the handler the relay service registered: same protocol, gated.
    raw.set_stream_handler(HOP_PROTOCOL_ID, _HopGate(relay, hop, admit, config).handle)
    # Each dial-back costs the hop a dial (py-libp2p's server reads its request with no
    # timeout): one at a time per peer, for the peers `admit` accepts, under a deadline.
    autonat = AutoNATService(raw, serve=False)
    dial_backs = _Gate(1, AUTONAT_TOTAL, admit, config.dial_timeout_s + 5.0)
    raw.set_stream_handler(
        AUTONAT_PROTOCOL_ID, functools.partial(dial_backs.run, handler=autonat.handle_stream)
    )


@asynccontextmanager
async def _maybe_dcutr(raw: Any, enabled: bool, config: NatConfig) -> AsyncIterator[Any]:
    """DCUtR on `raw` for the block's life when `enabled` (yields it; else None)."""
    if not enabled:
        yield None
        return
    from libp2p.tools.anyio_service import background_trio_service

    timeout = int(config.dial_timeout_s)
    dcutr = _scoped_dcutr_class()(
        raw, read_timeout=timeout, write_timeout=timeout, dial_timeout=timeout
    )
    async with background_trio_service(dcutr):
        yield dcutr


@functools.cache
def _scoped_dcutr_class() -> type:
    """py-libp2p's DCUtR, dialling only addresses `scope.may_dial` allows.

    A hole punch dials what the other side reports, in its DCUtR message and through
    identify (the peerstore): a hostile peer that got a circuit to a member could make it
    open TCP connections to the member's own loopback services or its LAN, a few per circuit
    and round. Every dial and UDP spray of the upgrade passes through `_dial_peer` and
    `_spam_udp_for_hole_punch`, so the rule sits there; `hops()` (the member's relay hops,
    set once the node exists) says how near an address may be. There too, a bucket bounds
    the dials of the whole host (`DCUTR_DIAL_BURST`): py-libp2p forgets a peer's attempts
    when it disconnects, so identities that reconnect could otherwise aim this host's dials
    at a third party without end."""
    from libp2p.relay.circuit_v2.dcutr import MAX_HOLE_PUNCH_ATTEMPTS, DCUtRProtocol

    class ScopedDCUtR(DCUtRProtocol):
        hops: Callable[[], Sequence[str]] = staticmethod(lambda: ())

        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.dials = TokenBucket(DCUTR_DIALS_PER_S, DCUTR_DIAL_BURST, time.monotonic())

        def allowed(self, addr: Any) -> bool:
            if not may_dial(str(addr), dial_floor(self.hops())):
                log.info("hole punch: not dialling %s (nearer than the relay hops)", addr)
                return False
            if self.dials.take(time.monotonic()) > 0:
                log.info("hole punch: not dialling %s (this host's dial budget is spent)", addr)
                return False
            return True

        async def _try_unilateral_upgrade(self, peer_id: Any) -> bool:
            # py-libp2p dials every address the peer reported before it counts an attempt,
            # and on every round: here the direct try costs an attempt like a punch does.
            attempts = self._hole_punch_attempts.get(peer_id, 0)
            if attempts >= MAX_HOLE_PUNCH_ATTEMPTS:
                return False
            self._hole_punch_attempts[peer_id] = attempts + 1
            return bool(await super()._try_unilateral_upgrade(peer_id))

        async def _dial_peer(self, peer_id: Any, addr: Any, *args: Any, **kw: Any) -> None:
            if self.allowed(addr):
                await super()._dial_peer(peer_id, addr, *args, **kw)

        async def _spam_udp_for_hole_punch(self, addr: Any, stop: Any) -> None:
            if self.allowed(addr):
                await super()._spam_udp_for_hole_punch(addr, stop)

    return ScopedDCUtR


class _Gate:
    """In front of a served protocol: refuses peers `admit` rejects, bounds each peer's
    streams in progress, and ends any stream after `deadline_s` of wall time, idle or not.

    For the relay hop, a CONNECT holds its stream for the circuit's life, so the bound is
    circuits per dialling peer, and the deadline ends idle circuits (py-libp2p checks a
    circuit's duration only when a chunk passes). For AutoNAT, a dial-back per stream."""

    def __init__(
        self,
        per_peer: int,
        total: int,
        admit: Callable[[str], bool] | None,
        deadline_s: float,
    ) -> None:
        self.per_peer = per_peer
        self.total = total
        self.admit = admit
        self.deadline_s = deadline_s
        self.active: Counter[str] = Counter()
        self.refused = 0

    async def run(self, stream: Any, handler: Callable[[Any], Awaitable[None]]) -> None:
        """`handler(stream)` within the gate's bounds, else `stream` reset."""
        peer = stream.muxed_conn.peer_id.to_base58()
        over = self.active[peer] >= self.per_peer or self.active.total() >= self.total
        if over or (self.admit is not None and not self.admit(peer)):
            self.refused += 1
            await reset_stream(stream)
            return
        self.active[peer] += 1
        try:
            with trio.move_on_after(self.deadline_s) as scope:
                await handler(stream)
            if scope.cancelled_caught:
                await reset_stream(stream)
        finally:
            self.active[peer] -= 1
            if not self.active[peer]:
                del self.active[peer]


class _HopGate:
    """In front of the relay hop: reads each stream's first message itself, then hands it
    to py-libp2p's RESERVE or CONNECT handler behind a budget of its own (`_Gate`).

    py-libp2p's own stream handler waits 30 s for a first message, and any stream counted
    from its opening: silent streams from a few admitted peers held every place. A stream
    here counts against the budgets only once its request arrived, within
    `HopLimits.first_message_s`; RESERVEs and CONNECTs have separate budgets, so circuits
    cannot starve reservations. And py-libp2p reserves for whatever peer id a RESERVE names:
    one admitted peer could take every slot for made-up ids, so a RESERVE for anyone but the
    connected peer is refused here, before py-libp2p's handler sees it."""

    def __init__(
        self, relay: Any, hop: HopLimits, admit: Callable[[str], bool] | None, config: NatConfig
    ) -> None:
        self.relay = relay
        self.hop = hop
        self.admit = admit
        self.waiting: Counter[str] = Counter()
        """Streams per peer whose first message has not arrived."""
        self.reserves = _Gate(RESERVES_PER_PEER, hop.reserves_total, None, config.stream_timeout_s)
        # A CONNECT holds its stream for the circuit's life, idle or not.
        self.circuits = _Gate(
            hop.circuits_per_source, hop.circuits_total, None, hop.circuit_seconds
        )
        self.refused = 0
        """Streams refused before any budget: strangers, silent, malformed, foreign RESERVEs."""

    async def handle(self, stream: Any) -> None:
        from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage

        msg = await self._request(stream)
        if msg is None:
            self.refused += 1
            await reset_stream(stream)
        elif msg.type == HopMessage.RESERVE:
            await self.reserves.run(stream, functools.partial(self._reserve, msg=msg))
        else:
            await self.circuits.run(stream, functools.partial(self.relay._handle_connect, msg=msg))

    async def _request(self, stream: Any) -> Any:
        """The stream's request, if it may be served: from an admitted peer, over a direct
        connection (the spec's rule, which py-libp2p's handler applied), a RESERVE or CONNECT
        that arrived in time and names no peer but the sender for a slot; else None."""
        from libp2p.relay.circuit_v2.protocol import _is_relayed_stream

        peer = stream.muxed_conn.peer_id
        if self.admit is not None and not self.admit(peer.to_base58()):
            return None
        if _is_relayed_stream(stream) or self.waiting[peer.to_base58()] >= HOP_WAITING_PER_PEER:
            return None
        msg = await self._first_message(stream)
        return msg if msg is not None and self._valid(msg, peer) else None

    async def _first_message(self, stream: Any) -> Any:
        """The first HopMessage on `stream`, or None when it is late or malformed."""
        from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
        from libp2p.relay.circuit_v2.utils import read_delimited_msg

        peer = stream.muxed_conn.peer_id.to_base58()
        self.waiting[peer] += 1
        try:
            with trio.move_on_after(self.hop.first_message_s):
                return await read_delimited_msg(stream, HopMessage)
        except Exception as e:  # libp2p raises whatever the stream or protobuf gave it
            log.info("hop: unreadable request from %s: %s", peer, e)
        finally:
            self.waiting[peer] -= 1
            if not self.waiting[peer]:
                del self.waiting[peer]
        return None

    def _valid(self, msg: Any, peer: Any) -> bool:
        """A RESERVE for the connected peer (or naming none) or a CONNECT, with any signed
        record of the sender's valid (py-libp2p's handler stored it; so do we)."""
        from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
        from libp2p.relay.circuit_v2.utils import maybe_consume_signed_record

        if msg.HasField("senderRecord") and not maybe_consume_signed_record(
            msg, self.relay.host, peer
        ):
            return False
        if msg.type == HopMessage.CONNECT:
            return True
        if msg.type != HopMessage.RESERVE:
            return False
        named = msg.peer.id if msg.HasField("peer") else b""
        if named and named != peer.to_bytes():
            log.info("hop: %s asked for a slot for another peer; refused", peer)
            return False
        return True

    async def _reserve(self, stream: Any, msg: Any) -> None:
        await self.relay._handle_reserve(stream, msg)
        # The answer is the whole exchange: a refresh comes on a stream of its own.
        await close_stream(stream)


class _StopGate:
    """In front of the STOP protocol (a relayed connection arriving at this node).

    py-libp2p accepts a STOP stream from anyone and upgrades it to a connection of the swarm
    with whatever identity the stream then presents, beside `protocol.inbound`: one TCP
    connection carried hundreds of such connections, filling the host. Here a STOP stream is
    accepted only from a hop this node holds a slot on (`P2PNode.reserved_on`), and only while
    that hop carries fewer than `NatConfig.relayed_per_hop` of our connections and all hops
    fewer than `NatConfig.relayed_total`."""

    def __init__(self, relay: Any, node: P2PNode) -> None:
        self.relay = relay
        self.node = node
        self.streams: dict[str, list[Any]] = {}
        """STOP streams accepted, per hop: each carries one relayed connection for as long as
        it is open (py-libp2p tags those with our own id, not the hop's, so the swarm cannot
        say which hop carries which)."""
        self.refused = 0

    def carrying(self) -> Counter[str]:
        """Relayed connections being made or open, per hop."""
        for hop, streams in list(self.streams.items()):
            if not (streams := [s for s in streams if not s.is_closed]):
                del self.streams[hop]
            else:
                self.streams[hop] = streams
        return Counter({hop: len(streams) for hop, streams in self.streams.items()})

    async def handle(self, stream: Any) -> None:
        hop = stream.muxed_conn.peer_id.to_base58()
        if not self._may_accept(hop):
            self.refused += 1
            await reset_stream(stream)
            return
        self.streams.setdefault(hop, []).append(stream)
        with trio.move_on_after(self.node.config.stream_timeout_s) as scope:
            await self.relay._handle_stop_stream(stream)
        if scope.cancelled_caught:
            await reset_stream(stream)

    def _may_accept(self, hop: str) -> bool:
        if hop not in self.node.reserved_on:
            return False
        carrying, config = self.carrying(), self.node.config
        return carrying[hop] < config.relayed_per_hop and carrying.total() < config.relayed_total


def p2p_mounts(
    node: P2PNode, limits: StreamLimits | None = None
) -> dict[str, httpx.AsyncBaseTransport]:
    """httpx mounts that send `p2p://peer/<id>` sources over `node`'s streams."""
    return {f"{SCHEME}://": P2PTransport(node.open_stream, limits)}


async def reachable_addrs(node: P2PNode, relays: Sequence[str]) -> tuple[Reachability, list[str]]:
    """Where others reach `node`: its own addresses when the first relay's dial-back check
    found it reachable, else a /p2p-circuit address on every relay that gave it a slot."""
    if not relays:
        return Reachability.UNKNOWN, node.addrs
    reach = await node.reachability(relays[0])
    if reach is Reachability.PUBLIC:
        return reach, node.addrs
    circuits = await reserve_on(node, relays)
    if not circuits:
        raise TransportError(f"not reachable ({reach.value}) and no relay gave a slot")
    return reach, circuits


async def reserve_on(node: P2PNode, relays: Sequence[str]) -> list[str]:
    """A slot on every relay that gives one: the /p2p-circuit addresses `node` is reached at
    (none when every relay refused or was down)."""
    circuits = []
    for relay in relays:
        try:
            circuits.append(await node.reserve(relay))
        except TransportError as e:  # one relay down or full: the others may do
            log.warning("no slot on %s: %s", relay, e)
    return circuits


def circuit_addr(hop: str, peer_id: str) -> str:
    """The address of `peer_id` through the relay hop at `hop` (a multiaddr ending in
    /p2p/<hop id>)."""
    return f"{hop.rstrip('/')}/p2p-circuit/p2p/{peer_id}"


def peer_of(addr: str) -> str:
    """The peer id a multiaddr ends in (`.../p2p/<id>`), after any /p2p-circuit."""
    _, sep, peer = addr.rstrip("/").rpartition("/p2p/")
    if not sep or not peer or "/" in peer:
        raise TransportError(f"{addr!r} does not end in /p2p/<peer id>")
    return peer


@asynccontextmanager
async def open_cli_node(
    args: Any, relays: Sequence[str]
) -> AsyncIterator[tuple[P2PNode | None, dict[str, httpx.AsyncBaseTransport] | None]]:
    """For the command line: a libp2p node and its fetch mounts when any p2p flag asks for
    one (a relay to reserve on, peers to reach, a listen address), else (None, None)."""
    if not (relays or args.p2p_peer or args.p2p_listen):
        yield None, None
        return
    async with open_node(Identity.generate(), [args.p2p_listen or "/ip4/0.0.0.0/tcp/0"]) as node:
        for addr in args.p2p_peer:
            node.learn(peer_of(addr), [addr])
        yield node, p2p_mounts(node)
