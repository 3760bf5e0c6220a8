"""The libp2p host of a node or coordinator: signed request/response on streams, and gossip.

One `Identity` is both the libp2p peer id and the key that signs every envelope, and the two are
tied together: a request must be signed by the peer whose connection carried it, and a response
by the peer we dialled. So a stream can never carry someone else's words.

Requests and responses are one frame each (`protocol.framing`) holding one envelope
(`protocol.envelope`), request then answer, in turn on a stream; an answered stream is kept for
the next request to the same peer and protocol (a new stream per request costs several times
more). The server refuses, with a signed `ErrorReply` after which it closes the stream, a peer
above its request rate, and anything that fails to verify; then it goes on serving everyone
else. Every network wait is bounded by a timeout.

What a request may cost us before we know it is welcome is bounded: the header alone decides
whether the body is read at all. A peer the route does not admit (`allowed_signer`, checked on
the connection's key), a frame above the route's limit, and a frame that would take the peer or
the host past its budget of bytes in flight (`protocol.inflight`) are refused unread. Before
even that, an address past its rate of new connections is closed before the Noise handshake,
and a peer that keeps sending while refused for rate has its new streams reset before protocol
negotiation for a while (`protocol.ratelimit.Cutoff`).

Gossip (gossipsub) is for small signed announcements only: py-libp2p drops large or frequent
messages without telling the publisher, so payloads go on streams.
"""

from __future__ import annotations

import enum
import functools
import logging
import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic

import multiaddr
import outcome
import trio

from protocol.addresses import dialable
from protocol.envelope import ENVELOPE_OVERHEAD, Envelope, EnvelopeVerifier, Verified, seal
from protocol.errors import (
    NotFresh,
    ProtocolError,
    RemoteError,
    SilentConnection,
    SwarmError,
    TransportError,
)
from protocol.framing import (
    HEADER_BYTES,
    MAX_FRAME_BYTES,
    READ_CHUNK,
    FrameTooLarge,
    Receive,
    encode_frame,
    parse_header,
    read_exactly,
    read_frame_or_eof,
)
from protocol.identity import Identity
from protocol.inflight import InflightBudget, OverBudget, Share
from protocol.ratelimit import Cutoff, RateLimiter
from protocol.wire import M, Message, ShortStr
from protocol.wire import decode as decode_message

log = logging.getLogger("swarmrl.protocol.host")

DEFAULT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)
GOSSIP_HARD_LIMIT = 1024 * 1024  # py-libp2p silently drops larger pubsub messages
MAX_IDLE_STREAMS = 4  # kept open per (peer, protocol) for the next request


class ErrorCode(enum.StrEnum):
    """What `ErrorReply.code` says; callers branch on these, never on the detail's words."""

    RATE_LIMITED = "rate_limited"
    """Above the per-peer request rate; retry after `retry_after_s`."""
    TOO_LARGE = "too_large"
    """The frame header declared more than the route's limit; refused unread."""
    FORBIDDEN = "forbidden"
    """The connection's key is not admitted on this route (e.g. not a member, or banned)."""
    PEER_BUSY = "peer_busy"
    """This peer already has too many request bytes in flight; retry after `retry_after_s`."""
    OVERLOADED = "overloaded"
    """The host has too many request bytes in flight from everyone, or from the class of peers
    this one shares a budget with (`Share`); retry after `retry_after_s`. Not the peer's
    fault, so not a mark against it."""
    BAD_REQUEST = "bad_request"
    STALE = "stale"
    """The envelope's time is outside the window or its nonce was seen (`NotFresh`): check
    the clock, or seal the retry anew. Not a mark against the sender."""
    REFUSED = "refused"
    """The handler refused the request (a `SwarmError`)."""
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class ErrorReply(Message, tag="error-reply"):
    """A server's signed refusal of one request: what kind, why, and when to retry."""

    max_bytes: ClassVar[int] = 2048

    code: ShortStr
    """One of `ErrorCode` (a handler may return its own codes too)."""
    detail: ShortStr = ""
    retry_after_s: float = 0.0


@dataclass(frozen=True)
class HostConfig:
    """Timeouts and limits of a host. The defaults suit a pool on the open internet."""

    dial_timeout_s: float = 10.0
    """One dial attempt (TCP connect + Noise + yamux)."""
    dial_attempts: int = 4
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 2.0
    request_timeout_s: float = 30.0
    """Whole request: dial, send, wait for and read the answer."""
    read_timeout_s: float = 30.0
    """Server side: time a peer has to deliver its request once it opened a stream."""
    handler_timeout_s: float = 60.0
    write_timeout_s: float = 30.0
    reuse_streams: bool = True
    """Keep answered request streams open for the next request to the same peer and protocol
    (several times faster for small messages than a stream per request)."""
    stream_idle_s: float = 60.0
    """Server side: how long an answered stream stays open for the peer's next request. Clients
    reuse an idle stream only during the first half of this."""
    reuse_within_s: float = 5.0
    """Clients reuse an idle stream only when its last answer came within this long: that
    answer showed the connection alive then. After a longer pause a new stream's negotiation,
    bounded by `dial_timeout_s`, finds out whether it still is (and closes it when it is
    silent: `negotiate_stream`), where a request on the old stream would wait its whole
    `request_timeout_s` for an answer that cannot come."""
    max_inflight_bytes_per_peer: int = 32 * 1024 * 1024
    """Request bytes one peer may have in flight (declared by frame headers, held until each
    request is answered). An honest node sends one submission at a time (the pool's
    `limits.max_submission_bytes`, 8 MiB by default) plus small requests; four times that
    leaves room for a retry overlapping a slow answer. Also the largest frame any route reads."""
    max_inflight_bytes: int = 256 * 1024 * 1024
    """Request bytes the host holds in flight from all peers together: the bound on what
    request buffering can add to its memory, whatever the number of peers or streams."""
    inflight_small_reserve: int = 16 * 1024 * 1024
    """Of `max_inflight_bytes`, what only frames no larger than a control message (64 KiB and
    its envelope) may use: peers sending large frames cannot shut joins, heartbeats and
    lease requests out (`protocol.inflight`)."""
    inflight_retry_s: float = 1.0
    """`retry_after_s` told to a peer refused for bytes in flight: about the time to read and
    answer a large frame, so a refused peer comes back when the budget has likely moved."""
    requests_per_s: float = 20.0
    """Per peer, across all protocols this host serves (pool spec: `limits.requests_per_s`)."""
    burst: float = 40.0
    cutoff_strikes: float = 40.0
    """Rate refusals a peer may collect at once (refilled at one every 2 s) before its new streams
    are reset unnegotiated for `cutoff_s`: it is not waiting as told (`ratelimit.Cutoff`)."""
    cutoff_s: float = 10.0
    connections_per_ip_s: float = 2.0
    """New inbound connections a second from one address (an IPv6 /64 counts as one), in
    bursts of `connection_burst`; past them a connection is closed before its Noise handshake,
    the costliest part of a connection (`bench/flood.py`)."""
    connection_burst: float = 32.0
    connections_held_per_ip: int = 32
    """Inbound connections one address (an IPv6 /64) may hold open at once, handshakes included
    (`protocol.inbound`): the rate above bounds how fast it opens them, this how many it keeps.
    An honest node holds one; many nodes behind one NAT share this."""
    max_connections: int = 300
    """Connections the host keeps, inbound and outbound (py-libp2p's default); when they are
    all held, idle strangers give way to newcomers and strangers to preferred peers
    (`Host.prefer`, `protocol.inbound`). Handshakes in progress are counted apart."""
    limit_loopback: bool = False
    """Count connections from loopback too (the rate and the count). Off by default: a peer on
    this machine is the operator's own process (the simulated swarm runs every process on
    127.0.0.1)."""
    gossip: bool = True
    gossip_heartbeat_s: int = 1
    gossip_max_bytes: int = 64 * 1024
    """Largest announcement `publish` accepts (envelope included)."""
    gossip_degree: tuple[int, int, int] = (6, 4, 12)
    """Gossipsub mesh degree: target, low, high."""


@dataclass
class HostStats:
    """Counters a dashboard or a test can read."""

    served: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    request_bytes_read: int = 0
    """Bytes read off request streams (headers, bodies, and at most one read chunk past a
    header that was refused)."""
    gossip_accepted: int = 0
    gossip_rejected: int = 0
    cutoffs: int = 0
    """Peers cut off (`HostConfig.cutoff_strikes`), counted once per cutoff."""
    streams_cut: int = 0
    """Streams reset unnegotiated because their peer was cut off."""
    connections_refused: int = 0
    """Inbound connections closed unhandshaken: their address was past its connection rate."""
    connections_over_held: int = 0
    """Inbound connections closed for want of a slot: their address held its share
    (`HostConfig.connections_held_per_ip`; before the handshake), or the host was full and no
    stranger could give way (after it; `protocol.inbound`)."""
    connections_evicted: int = 0
    """Strangers' connections closed to make room for a newcomer (`protocol.inbound`)."""
    handshakes_cut: int = 0
    """Inbound connections closed in their handshake to make room for newer ones."""
    window_violations: int = 0
    """Connections closed because their peer sent past a stream's receive window."""
    silent_connections_closed: int = 0
    """Connections closed because a stream negotiation on them met silence (`negotiate_stream`):
    dead although they looked open."""

    def refuse(self, code: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1


Handler = Callable[[Verified[Any]], Awaitable[Message]]
SignerPolicy = Callable[[bytes], bool]
SharePolicy = Callable[[bytes], Share | None]
"""The budget a signer's frames on a route draw on with others of its class, or None."""


@dataclass(frozen=True)
class _Route:
    """What `Host.serve` registered for one protocol."""

    protocol_id: str
    handler: Handler
    request_type: type[Message]
    response_type: type[Message]
    allowed_signer: SignerPolicy | None
    timeout: float
    limit: int
    """The largest request frame (envelope included) this route reads."""
    share_of: SharePolicy | None = None

    def admits(self, signer: bytes) -> bool:
        return self.allowed_signer is None or self.allowed_signer(signer)

    def share(self, signer: bytes) -> Share | None:
        return None if self.share_of is None else self.share_of(signer)


def pool_topic(pool_id: str, name: str) -> str:
    """The gossip topic `name` of one pool, so pools sharing peers never mix announcements."""
    return f"/swarmrl/{pool_id}/{name}"


@functools.lru_cache(maxsize=4096)  # parsing costs ~0.4 ms and runs for every request
def public_key_of_peer(peer_id: str) -> bytes:
    """The raw ed25519 key inside a `12D3KooW...` peer id; refuses any other kind of id."""
    from libp2p.crypto.ed25519 import Ed25519PublicKey
    from libp2p.peer.id import ID

    try:
        key = ID.from_base58(peer_id).extract_public_key()
    except Exception as e:  # base58 and protobuf raise assorted types on garbage
        raise ProtocolError(f"{peer_id!r} is not a valid peer id: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ProtocolError(f"peer {peer_id} does not use an ed25519 key; swarmrl needs one")
    return key.to_bytes()


def peek_kind(data: bytes, max_bytes: int) -> str:
    """The `kind` of an encoded envelope, without verifying it (to pick the type to open)."""
    return decode_message(data, Envelope, max_bytes=max_bytes).kind


class Host:
    """A running libp2p host bound to one identity and one pool. Make one with `Host.open`."""

    def __init__(
        self,
        identity: Identity,
        pool_id: str,
        libp2p_host: Any,
        config: HostConfig,
        verifier: EnvelopeVerifier,
    ) -> None:
        self.identity = identity
        self.pool_id = pool_id
        self.config = config
        self.verifier = verifier
        self.stats = HostStats()
        self.on_refusal: Callable[[str, str, str], None] | None = None
        """Called with (peer id, code, detail) whenever this host refuses a peer's request."""
        self._host = libp2p_host
        self._limiter = RateLimiter(config.requests_per_s, config.burst)
        self._cutoff = Cutoff(config.cutoff_strikes, cutoff_s=config.cutoff_s)
        self._connections = RateLimiter(config.connections_per_ip_s, config.connection_burst)
        self._inflight = InflightBudget(
            config.max_inflight_bytes_per_peer,
            config.max_inflight_bytes,
            small_reserve=config.inflight_small_reserve,
            small_frame=Message.max_bytes + ENVELOPE_OVERHEAD,
        )
        self._pubsub: Any = None
        self._gossipsub: Any = None
        self._dial_locks: dict[str, trio.Lock] = {}
        self._idle: dict[tuple[str, str], list[tuple[Any, float]]] = {}

    def _gate_streams(self) -> None:
        """Reset a cut-off peer's new streams before protocol negotiation, which is most of
        what a request costs this host (`ratelimit.Cutoff`)."""
        network = self._host.get_network()
        negotiate = network.common_stream_handler

        async def gate(net_stream: Any) -> None:
            if self._cutoff.cut_off(str(net_stream.muxed_conn.peer_id)):
                self.stats.streams_cut += 1
                await close_quietly(net_stream, reset=True)
                return
            await negotiate(net_stream)

        network.set_stream_handler(gate)

    def _gate_connections(self) -> None:
        """Close an inbound connection from an address past its connection rate before the
        security handshake (`HostConfig.connections_per_ip_s`). py-libp2p's own gate knows
        only allow and deny lists, and also filters our dials; this wraps inbound only. Count
        what `protocol.inbound` closes for want of a slot."""
        from protocol.inbound import Closed, connection_key

        network = self._host.get_network()
        accept = network._handle_inbound_connection

        async def gate(raw: Any, listen_addr: Any) -> None:
            key = connection_key(raw, exempt_loopback=not self.config.limit_loopback)
            if key is not None and self._connections.check(key) > 0:
                self.stats.connections_refused += 1
                await close_quietly(raw, reset=False)
                return
            await accept(raw, listen_addr)

        network._handle_inbound_connection = gate

        def closed(why: Closed) -> None:
            if why is Closed.REFUSED:
                self.stats.connections_over_held += 1
            elif why is Closed.EVICTED:
                self.stats.connections_evicted += 1
            else:
                self.stats.handshakes_cut += 1

        network.inbound_connections.on_close = closed

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        identity: Identity,
        pool_id: str,
        listen: Sequence[str] = DEFAULT_LISTEN,
        config: HostConfig | None = None,
        verifier: EnvelopeVerifier | None = None,
        announce: Sequence[str] | None = None,
    ) -> AsyncIterator[Host]:
        """Start a host listening on `listen`; it stops, with every stream, when the block ends.

        `announce` replaces the listen addresses in `addrs` (e.g. the public address of a host
        that listens on 0.0.0.0 behind a port forward)."""
        from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
        from libp2p.pubsub.pubsub import Pubsub
        from libp2p.tools.anyio_service import background_trio_service

        from protocol.inbound import InboundLimits
        from protocol.libp2p_stack import new_host

        config = config or HostConfig()
        addrs = [parse_multiaddr(a) for a in listen]
        inbound = InboundLimits(config.connections_held_per_ip, not config.limit_loopback)
        raw = new_host(
            identity.libp2p_key_pair(),
            inbound,
            listen_addrs=addrs,
            announce_addrs=[parse_multiaddr(a) for a in announce] if announce else None,
            connection_config=connection_config(config.dial_timeout_s, config.max_connections),
        )
        host = cls(identity, pool_id, raw, config, verifier or EnvelopeVerifier(pool_id))
        host._gate_streams()
        host._gate_connections()
        raw.get_network().upgrader.muxer_multistream.on_violation = host._window_violation
        if config.gossip:
            # Pubsub must exist before the first connection: it learns of peers only through
            # connection events, so a peer connected earlier would never be gossiped with.
            target, low, high = config.gossip_degree
            host._gossipsub = GossipSub(
                [PROTOCOL_ID_V11, PROTOCOL_ID],
                degree=target,
                degree_low=low,
                degree_high=high,
                heartbeat_interval=config.gossip_heartbeat_s,
            )
            host._pubsub = Pubsub(raw, host._gossipsub)
        try:
            async with raw.run(addrs):
                try:
                    # py-libp2p logs a failed listen (port in use, bad interface) and carries on
                    # without it; a host that is not where it was told to be must not start.
                    listening = len(raw.get_network().listeners)
                    if listening < len({str(a) for a in addrs}):
                        raise TransportError(
                            f"cannot listen on all of {list(listen)} (only {listening} worked); "
                            "is the port in use?"
                        )
                    if host._pubsub is None:
                        yield host
                    else:
                        async with (
                            background_trio_service(host._pubsub),
                            background_trio_service(host._gossipsub),
                        ):
                            with trio.fail_after(config.dial_timeout_s):
                                await host._pubsub.wait_until_ready()
                            yield host
                finally:
                    # Leaving run() only cancels libp2p's tasks; the listening socket and the
                    # connections stay open unless the host is closed explicitly.
                    with trio.move_on_after(config.write_timeout_s) as scope:
                        scope.shield = True
                        await raw.close()
        except OSError as e:
            raise TransportError(f"cannot listen on {list(listen)}: {e}") from None
        except BaseExceptionGroup as group:
            # libp2p's nurseries wrap whatever leaves the block (ours or the caller's) in
            # exception groups; hand back a lone exception as itself, so `except SwarmError`
            # and `pytest.raises` work on what the caller actually raised.
            leaves = _leaves(group)
            if len(leaves) == 1:
                raise leaves[0] from None
            raise

    def _window_violation(self, peer: Any) -> None:
        """`peer` sent past a stream's receive window, and its connection is being closed
        (`libp2p_stack.WindowedYamux`). No honest libp2p peer does that, so it is also cut off
        (its new streams reset for `cutoff_s`) and reported as a bad request (`on_refusal`: the
        coordinator counts that against a member)."""
        peer_id = str(peer)
        self.stats.window_violations += 1
        if self._cutoff.cut(peer_id):
            self.stats.cutoffs += 1
        self._report(peer_id, ErrorCode.BAD_REQUEST, "sent past a stream's receive window")

    def prefer(self, peers: Callable[[str], bool]) -> None:
        """Keep the connections of `peers` (a predicate on peer ids) when this host is full:
        strangers' connections give way to theirs, never the reverse (`protocol.inbound`)."""
        self._host.get_network().inbound_connections.preferred = peers

    # ----------------------------------------------------------------- names

    def observed_ip(self, peer_id: str) -> str | None:
        """The IP address `peer_id`'s connection to us comes from (the first one, when it
        holds several; a relay's, for a circuit); None when it holds none."""
        from libp2p.peer.id import ID

        for conn in self._host.get_network().get_connections(ID.from_base58(peer_id)):
            remote = conn.muxed_conn.get_remote_address()
            if remote:
                return remote[0]
        return None

    @property
    def peer_id(self) -> str:
        return self._host.get_id().to_base58()

    @property
    def libp2p(self) -> Any:
        """The py-libp2p host underneath, for protocols served beside the pool's (SHARDCAST
        over streams and circuit relay: `shardcast.nat.attach_node`)."""
        return self._host

    @property
    def addrs(self) -> list[str]:
        """Dialable multiaddrs of this host, each ending in `/p2p/<peer id>` (an unspecified
        listen address expanded into this machine's interface addresses)."""
        return dialable(str(a) for a in self._host.get_addrs())

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self._host.get_connected_peers()]

    # ----------------------------------------------------------------- dialling

    async def connect(self, peer: str) -> str:
        """Make sure we have a connection to `peer` (a multiaddr with `/p2p/`, or a known peer
        id); retry with exponential backoff inside `request_timeout_s`. Returns the peer id."""
        with trio.move_on_after(self.config.request_timeout_s) as scope:
            peer_id = await self._connect(peer)
        if scope.cancelled_caught:
            raise TransportError(
                f"could not reach {peer} within {self.config.request_timeout_s:.0f} s"
            )
        return peer_id

    async def _connect(self, peer: str) -> str:
        from libp2p.peer.id import ID
        from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

        if peer.startswith("/"):
            address = parse_multiaddr(peer)
            try:
                info = info_from_p2p_addr(address)
            except Exception as e:  # InvalidAddrError, or base58 errors inside the id
                raise ProtocolError(
                    f"{peer!r} is not a multiaddr ending in /p2p/<peer id>: {e}"
                ) from None
        else:
            public_key_of_peer(peer)  # refuses a malformed id with a clear message
            info = PeerInfo(ID.from_base58(peer), [])
        peer_id = info.peer_id.to_base58()
        if peer_id == self.peer_id:
            raise ProtocolError("refusing to dial ourselves")
        if self._host.get_network().connections.get(info.peer_id):
            return peer_id
        lock = self._dial_locks.setdefault(peer_id, trio.Lock())
        # One dial at a time per peer: concurrent requests must share the connection, not race
        # to open several (the host keeps one connection per peer).
        try:
            async with lock:
                return await self._dial(peer, peer_id, info)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._dial_locks.pop(peer_id, None)  # keep the table as small as the dials

    async def _dial(self, peer: str, peer_id: str, info: Any) -> str:
        from libp2p.peer.peerstore import PeerStoreError

        if self._host.get_network().connections.get(info.peer_id):
            return peer_id  # another request dialled while we waited for the lock
        if not info.addrs:
            # A bare peer id: use what the peerstore remembers (it forgets after a while).
            try:
                info.addrs = self._host.get_peerstore().addrs(info.peer_id)
            except PeerStoreError:  # a KeyError, not a libp2p error
                info.addrs = []
        if not info.addrs:
            raise TransportError(f"no known address for peer {peer_id}; dial a multiaddr")
        delay = self.config.backoff_initial_s
        last: BaseException | None = None
        network = self._host.get_network()
        for attempt in range(self.config.dial_attempts):
            # libp2p refuses to dial a peer whose addresses all failed in the last 60 s; our
            # own backoff decides when to retry, so that a coordinator back from a restart is
            # reachable at once rather than a minute later.
            network.unblock_peer(info.peer_id)
            try:
                with trio.fail_after(self.config.dial_timeout_s):
                    await self._host.connect(info)
                return peer_id
            except (Exception, trio.TooSlowError) as e:
                # Whatever a remote address makes libp2p raise (it is not consistent about
                # types) is a failed attempt; cancellation is a BaseException and passes.
                last = e
                log.debug("dial %s attempt %d failed: %s", peer_id, attempt + 1, e)
            if attempt + 1 < self.config.dial_attempts:
                # Jitter, so many nodes that lost the same peer do not retry in lockstep.
                await trio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, self.config.backoff_max_s)
        raise TransportError(
            f"could not reach {peer} after {self.config.dial_attempts} attempts: "
            f"{type(last).__name__}: {last}"
        )

    async def disconnect(self, peer_id: str) -> None:
        from libp2p.peer.id import ID

        with trio.move_on_after(self.config.write_timeout_s):
            await self._host.disconnect(ID.from_base58(peer_id))

    # ----------------------------------------------------------------- request / response

    async def request(
        self,
        peer: str,
        protocol_id: str,
        message: Message,
        response_type: type[M],
        *,
        timeout_s: float | None = None,
    ) -> Verified[M]:
        """Send `message` to `peer` on `protocol_id` and return its verified answer.

        Raises `RemoteError` when the peer refused (with its code), `ProtocolError` when the
        answer is malformed or not signed by that peer, `TransportError` when the peer cannot be
        reached or does not answer within `timeout_s`.
        """
        timeout = self.config.request_timeout_s if timeout_s is None else timeout_s
        frame = encode_frame(seal(self.identity, self.pool_id, message))
        with trio.move_on_after(timeout) as scope:
            peer_id = await self._connect(peer)
            data = await self._exchange(peer_id, protocol_id, frame, response_type)
        if scope.cancelled_caught:
            raise TransportError(f"{peer} did not answer on {protocol_id} within {timeout:g} s")
        peer_key = public_key_of_peer(peer_id)
        limit = max(response_type.max_bytes, ErrorReply.max_bytes) + ENVELOPE_OVERHEAD
        if peek_kind(data, limit) == ErrorReply.kind():
            err = self.verifier.open(data, ErrorReply, signer=peer_key).message
            raise RemoteError(err.code, err.detail, err.retry_after_s)
        return self.verifier.open(data, response_type, signer=peer_key)

    async def _exchange(
        self, peer_id: str, protocol_id: str, frame: bytes, response_type: type[Message]
    ) -> bytes:
        limit = max(response_type.max_bytes, ErrorReply.max_bytes) + ENVELOPE_OVERHEAD
        # At most one retry, and only on a reused idle stream that failed before a single byte
        # of answer came back: the server had closed it (idle timeout) or the connection died,
        # so the request was not handled. The retry resends the same envelope (same nonce), so
        # even a server that did handle it would refuse the copy as a replay: at most once.
        for _ in range(2):
            stream, reader, reused = await self._checkout(peer_id, protocol_id)
            keep = False
            try:
                try:
                    data = await _write_while_reading(stream, reader, frame, limit)
                except ProtocolError:
                    raise
                except Exception as e:
                    if reused and not reader.received:
                        continue
                    raise TransportError(f"{peer_id} dropped the stream: {e}") from None
                if data is None:
                    if reused:
                        continue
                    raise TransportError(f"{peer_id} closed the stream without answering")
                # After an error reply the server closes the stream; so do we.
                keep = peek_kind(data, limit) != ErrorReply.kind()
                return data
            finally:
                if keep:
                    await self._checkin(peer_id, protocol_id, stream, reader)
                else:
                    # A cancelled or failed exchange must not leave a half-used stream around.
                    await close_quietly(stream, reset=True)
        raise TransportError(f"{peer_id} closed the stream twice without answering")

    async def _checkout(self, peer_id: str, protocol_id: str) -> tuple[Any, _StreamReader, bool]:
        """An idle stream to reuse (True), or a new one (False), with its reader.

        A stream per request costs ~5x a frame on an open stream (multistream negotiation,
        yamux open and close), so answered streams are kept for the next request.
        """
        idle = self._idle.pop((peer_id, protocol_id), [])
        now = trio.current_time()
        # Well inside the server's idle timeout, so it has not started closing it, and soon
        # enough after its last answer that the connection is most likely still alive.
        fresh_s = min(self.config.stream_idle_s / 2, self.config.reuse_within_s)
        try:
            while idle:
                stream, since = idle.pop()
                if now - since < fresh_s and not stream.is_closed:
                    # A fresh reader: nothing may be pending between an answer and the next
                    # request, and `received` must count this request's answer only.
                    return stream, _StreamReader(stream), True
                await close_quietly(stream, reset=True)
        finally:
            if idle:  # the rest go back; an empty entry is not kept
                self._idle.setdefault((peer_id, protocol_id), []).extend(idle)
        stream = await self._open_stream(peer_id, protocol_id)
        return stream, _StreamReader(stream), False

    async def _checkin(
        self, peer_id: str, protocol_id: str, stream: Any, reader: _StreamReader
    ) -> None:
        if self.config.reuse_streams and not reader.pending:
            idle = self._idle.setdefault((peer_id, protocol_id), [])
            if len(idle) < MAX_IDLE_STREAMS:
                idle.append((stream, trio.current_time()))
                return
        await close_quietly(stream, reset=False)

    async def _open_stream(self, peer_id: str, protocol_id: str) -> Any:
        from libp2p.protocol_muxer.exceptions import MultiselectClientError

        try:
            return await negotiate_stream(
                self._host, peer_id, protocol_id, self.config.dial_timeout_s
            )
        except SilentConnection:
            self.stats.silent_connections_closed += 1
            raise
        except Exception as e:
            # libp2p wraps a failed protocol negotiation in StreamFailure: the peer does not
            # serve the protocol, or reset the stream (a cut-off peer's are), or went away.
            if isinstance(e, MultiselectClientError) or isinstance(
                e.__cause__, MultiselectClientError
            ):
                why = e if isinstance(e, MultiselectClientError) else e.__cause__
                raise TransportError(
                    f"{peer_id} does not serve {protocol_id}, or refused the stream: {why}"
                ) from None
            raise TransportError(f"cannot open a stream to {peer_id}: {e}") from None

    def serve(
        self,
        protocol_id: str,
        handler: Handler,
        request_type: type[Message],
        response_type: type[Message],
        *,
        allowed_signer: SignerPolicy | None = None,
        share_of: SharePolicy | None = None,
        timeout_s: float | None = None,
        max_bytes: int | None = None,
    ) -> None:
        """Answer requests on `protocol_id`: `handler` gets each verified `request_type` and
        returns a `response_type`. Raising a `SwarmError` refuses that request with its message;
        any other exception is logged and answered as `internal` without details.

        `allowed_signer` admits keys; it is asked with the connection's key as soon as a frame
        header arrives (a peer it refuses costs us no body) and again once the body is read.
        `share_of` names the budget a signer's frames draw on together with others of its
        class (e.g. every node on probation), on top of its own and the host's.
        `max_bytes` caps the request frame (the sealed envelope) below what `request_type`
        allows, e.g. to the pool's `limits.max_submission_bytes`. No route reads a frame above
        `HostConfig.max_inflight_bytes_per_peer`, the most one peer may have in flight."""
        from libp2p.custom_types import TProtocol

        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        limit = min(
            request_type.max_bytes + ENVELOPE_OVERHEAD,
            self.config.max_inflight_bytes_per_peer,
            max_bytes if max_bytes is not None else MAX_FRAME_BYTES,
        )
        timeout = self.config.handler_timeout_s if timeout_s is None else timeout_s
        route = _Route(
            protocol_id,
            handler,
            request_type,
            response_type,
            allowed_signer,
            timeout,
            limit,
            share_of,
        )
        self._host.set_stream_handler(
            TProtocol(protocol_id), functools.partial(self._serve_stream, route=route)
        )

    def unserve(self, protocol_id: str) -> None:
        from libp2p.custom_types import TProtocol

        self._host.remove_stream_handler(TProtocol(protocol_id))

    @property
    def inflight_bytes(self) -> int:
        """Request bytes reserved by frames being read or handled right now."""
        return self._inflight.held

    async def _serve_stream(self, stream: Any, *, route: _Route) -> None:
        """Answer requests on one stream until the peer closes it, goes idle, or is refused."""
        peer_id = stream.muxed_conn.peer_id.to_base58()
        receive = _StreamReader(stream, on_read=self._count_read).receive
        first = True
        try:
            while True:
                # The first request is due promptly; later ones may come after a pause.
                wait_s = self.config.read_timeout_s if first else self.config.stream_idle_s
                with trio.move_on_after(wait_s) as idle:
                    start = await receive(1)
                if idle.cancelled_caught or not start:
                    if first and idle.cancelled_caught:
                        await self._send(stream, self._error("timeout", "no request in time"))
                    return
                first = False
                reply, ok = await self._answer(start, receive, peer_id, route)
                await self._send(stream, reply)
                if not ok:
                    return  # after a refusal the stream may be out of step: end it
                # A request served is what keeps a connection from giving way when the host
                # is full (`protocol.inbound`); refused ones do not count.
                self._host.get_network().inbound_connections.touch(stream.muxed_conn)
        except Exception as e:
            log.debug("stream from %s on %s ended: %s", peer_id, route.protocol_id, e)
        finally:
            # Closed, not reset, even after a refusal: a reset can overtake the error reply in
            # py-libp2p, and the client, which stops writing once it reads the reply, resets.
            await close_quietly(stream, reset=False)

    def _count_read(self, n: int) -> None:
        self.stats.request_bytes_read += n

    async def _answer(
        self, start: bytes, receive: Receive, peer_id: str, route: _Route
    ) -> tuple[bytes, bool]:
        """One request whose first byte is `start`: (sealed answer, True) or (refusal, False).

        Everything that can refuse without the body runs before a byte of it is read."""
        try:
            signer = self._admit(peer_id)
            deadline = trio.current_time() + self.config.read_timeout_s
            length = await self._read_header(start, receive, deadline, signer, route)
            share = route.share(signer)
            self._reserve(peer_id, length, share)
            try:
                with trio.fail_at(deadline):
                    data = await read_exactly(receive, length)
                verified = self._verify(data, signer, route)
                return await self._handle(verified, peer_id, route)
            finally:
                self._inflight.release(peer_id, length, share)
        except _Refusal as r:
            return self._error(r.code, r.detail, r.retry_after_s, peer_id=peer_id), False
        except trio.TooSlowError:
            return self._error("timeout", "request not received in time", peer_id=peer_id), False
        except NotFresh as e:
            return self._error(ErrorCode.STALE, str(e), peer_id=peer_id), False
        except ProtocolError as e:
            return self._error(ErrorCode.BAD_REQUEST, str(e), peer_id=peer_id), False

    def _admit(self, peer_id: str) -> bytes:
        """The peer's key, once its request rate allows one more request."""
        wait = self._limiter.check(peer_id)
        if wait > 0:
            if self._cutoff.strike(peer_id):
                self.stats.cutoffs += 1
                log.warning(
                    "%s keeps sending while refused: its new streams are reset for %g s",
                    peer_id,
                    self.config.cutoff_s,
                )
            # Refused before reading the frame: an over-eager peer costs us its stream and one
            # signature; one that keeps coming is cut off (above).
            raise _Refusal(ErrorCode.RATE_LIMITED, "too many requests; slow down", wait)
        return public_key_of_peer(peer_id)

    async def _read_header(
        self, start: bytes, receive: Receive, deadline: float, signer: bytes, route: _Route
    ) -> int:
        """The body length the header declares, once the route admits the peer and the size."""
        with trio.fail_at(deadline):
            header = start + await read_exactly(receive, HEADER_BYTES - 1)
        self._check_signer(signer, route)
        try:
            return parse_header(header, route.limit)
        except FrameTooLarge as e:
            raise _Refusal(ErrorCode.TOO_LARGE, str(e)) from None

    def _check_signer(self, signer: bytes, route: _Route) -> None:
        if not route.admits(signer):
            raise _Refusal(ErrorCode.FORBIDDEN, f"{signer.hex()[:12]} is not admitted here")

    def _reserve(self, peer_id: str, length: int, share: Share | None) -> None:
        """Reserve the body's bytes for as long as the request is read and handled."""
        try:
            self._inflight.reserve(peer_id, length, share)
        except OverBudget as e:
            code = ErrorCode.PEER_BUSY if e.scope == "peer" else ErrorCode.OVERLOADED
            raise _Refusal(code, str(e), self.config.inflight_retry_s) from None

    def _verify(self, data: bytes, signer: bytes, route: _Route) -> Verified[Any]:
        # The key is checked again: membership may have changed (a ban) while the body arrived.
        self._check_signer(signer, route)
        return self.verifier.open(data, route.request_type, signer=signer)

    async def _handle(
        self, verified: Verified[Any], peer_id: str, route: _Route
    ) -> tuple[bytes, bool]:
        try:
            with trio.fail_after(route.timeout):
                response = await route.handler(verified)
            if isinstance(response, ErrorReply):
                self.stats.refuse(response.code)
                return seal(self.identity, self.pool_id, response), False
            if not isinstance(response, route.response_type):
                raise TypeError(
                    f"handler of {route.protocol_id} returned {type(response).__name__}, "
                    f"expected {route.response_type.__name__}"
                )
            reply = seal(self.identity, self.pool_id, response)
        except trio.TooSlowError:
            raise _Refusal(ErrorCode.TIMEOUT, f"no answer within {route.timeout:g} s") from None
        except SwarmError as e:
            raise _Refusal(ErrorCode.REFUSED, str(e)) from None
        except Exception:
            # A bug in one handler must not take the host down; the peer learns only that it
            # failed, the log gets the traceback.
            log.exception("handler of %s failed on a request from %s", route.protocol_id, peer_id)
            raise _Refusal(ErrorCode.INTERNAL, "the server failed to handle this request") from None
        self.stats.served += 1
        return reply, True

    def _error(
        self, code: str, detail: str, retry_after_s: float = 0.0, peer_id: str | None = None
    ) -> bytes:
        self.stats.refuse(code)
        if peer_id is not None:
            self._report(peer_id, code, detail)
        reply = ErrorReply(code=code, detail=detail[:256], retry_after_s=retry_after_s)
        return seal(self.identity, self.pool_id, reply)

    def _report(self, peer_id: str, code: str, detail: str) -> None:
        """Tell `on_refusal` (e.g. the coordinator counts forged, malformed or replayed requests
        against the peer that sent them: the connection's identity, which cannot be faked)."""
        if self.on_refusal is None:
            return
        try:
            self.on_refusal(peer_id, code, detail)
        except Exception:  # the owner's bug must not break the transport's refusal
            log.exception("on_refusal callback failed")

    async def _send(self, stream: Any, envelope: bytes) -> None:
        with trio.fail_after(self.config.write_timeout_s):
            await stream.write(encode_frame(envelope))

    # ----------------------------------------------------------------- gossip

    async def publish(self, topic: str, message: Message) -> None:
        """Sign `message` and gossip it on `topic`. Small announcements only."""
        if self._pubsub is None:
            raise SwarmError("this host was opened with gossip=False")
        data = seal(self.identity, self.pool_id, message)
        limit = min(self.config.gossip_max_bytes, GOSSIP_HARD_LIMIT)
        if len(data) > limit:
            raise ProtocolError(
                f"announcement of {len(data)} bytes exceeds the {limit}-byte gossip limit; "
                "send payloads on a stream and gossip only a pointer to them"
            )
        with trio.fail_after(self.config.write_timeout_s):
            await self._pubsub.publish(topic, data)

    @asynccontextmanager
    async def subscribe(
        self,
        topic: str,
        message_type: type[M],
        *,
        signer: bytes | None = None,
        allowed_signer: SignerPolicy | None = None,
        check: Callable[[Verified[M]], bool] | None = None,
    ) -> AsyncIterator[Subscription[M]]:
        """Receive verified `message_type` announcements on `topic` inside the block.

        Every message is verified (signature, pool, replay, `signer` / `allowed_signer`, then
        `check`) before gossipsub forwards it, so an invalid one stops at the first honest host.
        """
        if self._pubsub is None:
            raise SwarmError("this host was opened with gossip=False")
        if topic in self._pubsub.topic_validators:
            raise SwarmError(f"already subscribed to {topic}")
        accepted: OrderedDict[bytes, Verified[M]] = OrderedDict()
        limit = min(message_type.max_bytes + ENVELOPE_OVERHEAD, GOSSIP_HARD_LIMIT)

        def validate(forwarder: Any, msg: Any) -> bool:
            data = bytes(msg.data)
            try:
                if len(data) > limit:
                    raise ProtocolError(f"announcement of {len(data)} bytes is too large")
                verified = self.verifier.open(
                    data, message_type, signer=signer, allowed_signer=allowed_signer
                )
                if check is not None and not check(verified):
                    raise ProtocolError("refused by the topic's check")
            except ProtocolError as e:
                self.stats.gossip_rejected += 1
                log.debug("dropped an announcement on %s via %s: %s", topic, forwarder, e)
                return False
            self.stats.gossip_accepted += 1
            # pubsub validates only a message's first delivery: the forwarder did us a service,
            # and it keeps its connection like a peer we serve (`protocol.inbound`)
            self._host.get_network().inbound_connections.touch_peer(str(forwarder))
            accepted[data] = verified
            while len(accepted) > 1024:  # delivered ones are popped; this bounds the others
                accepted.popitem(last=False)
            return True

        self._pubsub.set_topic_validator(topic, validate, False)
        try:
            raw_sub = await self._pubsub.subscribe(topic)
            yield Subscription(raw_sub, accepted)
        finally:
            self._pubsub.remove_topic_validator(topic)
            with trio.move_on_after(self.config.write_timeout_s) as scope:
                scope.shield = True
                await self._pubsub.unsubscribe(topic)

    def gossip_peers(self, topic: str) -> list[str]:
        """Peers in our gossipsub mesh for `topic` (those we forward to)."""
        if self._gossipsub is None:
            return []
        return [p.to_base58() for p in self._gossipsub.mesh.get(topic, ())]


class _Refusal(Exception):
    """Raised inside `Host._answer` to refuse the request with this code."""

    def __init__(self, code: ErrorCode, detail: str, retry_after_s: float = 0.0) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.retry_after_s = retry_after_s


class Subscription(Generic[M]):
    """Async iterator of the verified announcements of one topic."""

    def __init__(self, raw: Any, accepted: OrderedDict[bytes, Verified[M]]) -> None:
        self._raw = raw
        self._accepted = accepted

    def __aiter__(self) -> Subscription[M]:
        return self

    async def __anext__(self) -> Verified[M]:
        while True:
            try:
                msg = await self._raw.get()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                raise StopAsyncIteration from None
            verified = self._accepted.pop(bytes(msg.data), None)
            if verified is not None:
                return verified

    async def next(self, timeout_s: float) -> Verified[M]:
        """The next announcement, or `TransportError` when none comes within `timeout_s`."""
        with trio.move_on_after(timeout_s):
            return await self.__anext__()
        raise TransportError(f"no announcement within {timeout_s:g} s")


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out += _leaves(e) if isinstance(e, BaseExceptionGroup) else [e]
    return out


def connection_config(dial_timeout_s: float, max_connections: int = 300) -> Any:
    """py-libp2p's connection settings for our hosts (a `libp2p.network.config.ConnectionConfig`,
    imported lazily: a heavy import)."""
    from libp2p.network.config import ConnectionConfig

    return ConnectionConfig(
        max_connections=max_connections,
        high_watermark=max_connections,
        # One connection per peer: without it every connect() waits ~250 ms for a second.
        max_connections_per_peer=1,
        dial_timeout=dial_timeout_s,
        # libp2p's auto-connector would otherwise dial every peer it has heard of, and
        # poll fast while below 50 connections; a pool dials whom it needs, itself.
        min_connections=0,
        low_watermark=0,
        auto_connect_interval=3600.0,
        # Past `negotiate_stream`'s own bound, which so fires first on a silent connection.
        outbound_stream_protocol_negotiation_timeout=3 * dial_timeout_s,
    )


def parse_multiaddr(text: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(text)
    except Exception as e:  # multiaddr raises several unrelated types on bad input
        raise ProtocolError(f"{text!r} is not a valid multiaddr: {e}") from None


class _StreamReader:
    """Reads a libp2p stream in large chunks and hands out exactly the bytes asked for.

    py-libp2p's yamux answers every read with a window-update frame to the peer, so reading a
    frame as header, then body, costs extra frames each way; one large read per arriving chunk
    avoids that. Bytes past the current frame wait here for the next one (at most one chunk).
    """

    def __init__(self, stream: Any, on_read: Callable[[int], None] | None = None) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._on_read = on_read
        self.received = 0
        """Bytes read off the stream so far."""

    @property
    def pending(self) -> int:
        """Bytes read but not yet handed out: past the end of the last frame."""
        return len(self._buffer)

    async def receive(self, n: int) -> bytes:
        from libp2p.network.stream.exceptions import StreamEOF

        if not self._buffer:
            try:
                chunk = await self._stream.read(READ_CHUNK)
            except StreamEOF:
                return b""
            if not chunk:
                return b""
            self.received += len(chunk)
            if self._on_read is not None:
                self._on_read(len(chunk))
            if len(chunk) <= n:
                return chunk
            self._buffer += chunk
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out


async def _write_while_reading(
    stream: Any, reader: _StreamReader, frame: bytes, limit: int
) -> bytes | None:
    """Send `frame` and read the one answer, or None when the stream ended without one.

    The two run at once because a server refuses on the header alone (rate, membership, size,
    bytes in flight): it answers before reading the body, then stops reading, so a large body
    written first would wait on flow control until the muxer gives up. An error reply stops the
    write; any other answer comes only after the server read the whole frame, so the write has
    finished and the stream stays in step for reuse.
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_write_noting_failure, stream, frame)
        # Captured, not raised here: raised inside the nursery it would come out wrapped in an
        # exception group, and the caller sorts errors by type.
        answer = await outcome.acapture(read_frame_or_eof, reader.receive, limit)
        if not _accepted(answer, limit):
            # Reset, not cancel: the write stops at its next muxer frame. Cancelled inside a
            # frame it would leave half a frame on the connection and break every stream on it.
            await close_quietly(stream, reset=True)
    return answer.unwrap()


def _accepted(answer: outcome.Outcome, limit: int) -> bool:
    """Whether `answer` is a well-formed reply other than an `ErrorReply`."""
    if isinstance(answer, outcome.Error) or answer.value is None:
        return False
    try:
        return peek_kind(answer.value, limit) != ErrorReply.kind()
    except ProtocolError:
        return False  # the caller raises it when it looks again


async def _write_noting_failure(stream: Any, frame: bytes) -> None:
    try:
        await stream.write(frame)
    except Exception as e:
        # What the server said, if anything, is read by the other task and decides the outcome;
        # a failed write matters only through that (a refusal, or no answer at all).
        log.debug("write of a %d-byte request failed: %r", len(frame), e)


async def negotiate_stream(raw: Any, peer_id: str, protocol_id: str, timeout_s: float) -> Any:
    """A new `protocol_id` stream to `peer_id` on py-libp2p host `raw`, negotiated within
    `timeout_s`; py-libp2p's own errors (refused, unsupported, gone) pass through.

    A live peer's libp2p answers a negotiation in one round trip, whatever its handlers are
    doing, so silence means the connection is dead although it still looks open (its peer
    restarted behind it, a path dropped it), or this process's event loop was starved that
    long (a busy loop here once did it; its requests were failing either way). py-libp2p would
    keep the connection and every later request would wait on it again, so it is closed here
    and `SilentConnection` raised: the next try dials afresh. py-libp2p's own negotiation bound
    is set longer (`connection_config`) so that silence is told from refusal by type, never by
    message."""
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID

    pid = ID.from_base58(peer_id)
    with trio.move_on_after(timeout_s):
        return await raw.new_stream(pid, [TProtocol(protocol_id)])
    log.info("silent connection to %s: %s", peer_id, _stream_slots(raw, pid))
    with trio.move_on_after(2.0) as scope:
        scope.shield = True  # bounded, and done even when the caller is being cancelled
        try:
            await raw.disconnect(pid)
        except Exception as e:  # the connection may already be gone in any of several ways
            log.debug("closing a silent connection: %s", e)
    raise SilentConnection(
        f"{peer_id} did not negotiate {protocol_id} within {timeout_s:g} s on an open "
        "connection; closed it, the next try dials afresh"
    )


def _stream_slots(raw: Any, pid: Any) -> str:
    """py-libp2p's stream slots as a silent connection left them, for its log line: a local
    queue (the swarm's stream semaphore, a connection's yamux backlog) looks like silence
    too. Private counters, read defensively."""
    network = raw.get_network()
    swarm_slots = getattr(getattr(network, "_stream_semaphore", None), "value", None)
    held = []
    for conn in network.connections.get(pid, []):
        muxed = getattr(conn, "muxed_conn", None)
        backlog = getattr(getattr(muxed, "stream_backlog_semaphore", None), "value", None)
        held.append(f"{len(getattr(muxed, 'streams', {}))} streams, backlog free {backlog}")
    return f"swarm stream slots free {swarm_slots}; connections: {held or 'none'}"


async def close_quietly(stream: Any, reset: bool) -> None:
    # Shielded and bounded: closing must happen even when the caller was cancelled, and must not
    # hang on a peer that stopped reading.
    with trio.move_on_after(2.0) as scope:
        scope.shield = True
        try:
            if reset:
                await stream.reset()
            else:
                await stream.close()
        except Exception as e:  # the stream may already be gone in any of several ways
            log.debug("closing a stream: %s", e)


__all__ = [
    "DEFAULT_LISTEN",
    "ErrorCode",
    "ErrorReply",
    "Host",
    "HostConfig",
    "HostStats",
    "Subscription",
    "close_quietly",
    "negotiate_stream",
    "parse_multiaddr",
    "peek_kind",
    "pool_topic",
    "public_key_of_peer",
]
