"""The security and muxer layers every libp2p host of ours offers: Noise, then yamux with its
receive window enforced. Nothing else.

py-libp2p's `new_host` offers more by default, and a dialler picks:

- `/plaintext/2.0.0` exchanges public keys without proving either is held, so a dialler can
  claim any peer id. Our transport pins every request's signer, rate bucket, cutoff and refusal
  count to the connection's peer id; over plaintext a stranger could spend an honest member's
  budgets and collect strikes in its name until the coordinator bans it. secio and TLS are
  dropped too: every swarmrl host speaks Noise, and each extra handshake is more code a
  stranger can reach before it is anyone.
- mplex has no flow control at all, and py-libp2p's yamux only logs a peer that sends past the
  window it was given, then buffers whatever comes (measured: one stranger made a host buffer
  512 MiB in 3-5 s on a stream it had already refused, and held it there while connected).
  `WindowedYamux` closes such a connection instead, as go-yamux does, so a stream's buffer never
  holds more than the window we granted (256 KiB, growing to 16 MiB only as we read).

A peer that keeps to its windows can still leave bytes behind: what it sends on a stream past
what the protocol reads (a request we refused, an identify stream) stays buffered until it closes
its side, and py-libp2p kept a stream it never closed for as long as the connection lived
(measured: 20 identify streams held 5 MB, 96 refused request streams 18.7 MB, and nothing
limits how many). `WindowedYamux` gives a peer `LINGER_S` to close a stream we have closed, and
keeps at most `MAX_LINGERING` such streams per connection; past either it resets the stream and
drops what it holds.

What a peer says about itself is kept within bounds too: identify (and identify push, which a
peer may send as often as it likes) stored every address and protocol name a peer listed, up to
a 1 MiB message each time, for up to 1,000 peers, and deduplicated the addresses in quadratic
time (measured: 10 fresh identities listing 15,000 addresses each left 75,000 addresses and
3.9 MB of signed peer records in a host's store after they left; `bench/muxer_flood.py`).
`CappedPeerStore` keeps a peer's newest 32 addresses and 64 protocols, and no signed peer
record over 8 KiB.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import libp2p
import trio
from libp2p.abc import IHost, IMuxedConn, ISecureConn
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.envelope import Envelope
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStore
from libp2p.rcmgr import ResourceManager, new_resource_manager
from libp2p.rcmgr.connection_limits import ConnectionLimits
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.muxer_multistream import MuxerMultistream
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from multiaddr import Multiaddr

from protocol.inbound import InboundConnections, InboundLimits

log = logging.getLogger(__name__)

LINGER_S = 30.0
"""How long a stream we closed our side of waits for the peer to close its side before it is
reset. Not sooner: py-libp2p's reset overtakes data the peer has received but not yet read, so
the peer gets this long to read our last answer (at most one window, 16 MiB)."""
MAX_LINGERING = 64
"""Streams per connection closed on our side only; past it the oldest is reset. Enough for the
answers a peer may still be reading (SHARDCAST's libp2p server answers a peer 16 at once)."""
REAP_EVERY_S = 5.0


class ReceiveWindowExceeded(trio.TooSlowError):
    """A peer sent a stream more than the receive window it was granted.

    A subclass of `trio.TooSlowError` because that is the one error py-libp2p's yamux read loop
    answers, from every place it buffers data, by closing the whole connection (it is what a
    frame body past its read deadline raises). The bytes are dropped, never buffered."""


class _WindowedBuffer(bytearray):
    """A stream's receive buffer that refuses bytes past the stream's receive window."""

    def __init__(self, muxer: Yamux, stream_id: int, initial: bytes = b"") -> None:
        super().__init__(initial)
        self._muxer = muxer
        self._stream_id = stream_id

    def extend(self, data: Any) -> None:
        stream = self._muxer.streams.get(self._stream_id)
        # py-libp2p raises the window before announcing it, so a peer that keeps to what it was
        # told never sends more than `recv_window` (go-yamux's rule: anything past it is fatal).
        if stream is not None and len(data) > stream.recv_window:
            log.warning(
                "closing the connection of %s: it sent past its receive window", self._muxer.peer_id
            )
            self._muxer.on_violation(self._muxer.peer_id)
            raise ReceiveWindowExceeded(
                f"stream {self._stream_id} of {self._muxer.peer_id}: {len(data)} bytes "
                f"against a window of {stream.recv_window}"
            )
        super().extend(data)


class _WindowedBuffers(dict):
    """The muxer's table of receive buffers; every buffer put in it checks the window."""

    def __init__(self, muxer: Yamux) -> None:
        super().__init__()
        self._muxer = muxer

    def __setitem__(self, stream_id: int, buffer: bytearray) -> None:
        super().__setitem__(stream_id, _WindowedBuffer(self._muxer, stream_id, buffer))


class WindowedYamux(Yamux):
    """py-libp2p's yamux, closing a connection whose peer ignores its receive windows, and
    resetting streams the peer leaves open after we closed ours (see the module's docstring)."""

    def __init__(
        self, *args: Any, on_violation: Callable[[ID], None] = lambda peer: None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.on_violation = on_violation
        """Called with the peer's id when it sends past a receive window (the host's hook)."""
        self.stream_buffers = _WindowedBuffers(self)
        self._lingering: dict[int, float] = {}
        """Stream id -> when we closed our side, oldest first, while the peer's side is open."""

    async def handle_incoming(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reap_lingering)
            try:
                await super().handle_incoming()
            finally:
                nursery.cancel_scope.cancel()

    async def _finalize_stream(self, stream: Any, *, fully_closed: bool) -> None:
        # Every local close and reset comes here (a peer's close does not).
        await super()._finalize_stream(stream, fully_closed=fully_closed)
        sid = stream.stream_id
        if fully_closed or stream.closed or not stream.send_closed:
            self._lingering.pop(sid, None)
            return
        self._lingering.setdefault(sid, trio.current_time())
        if len(self._lingering) > MAX_LINGERING:
            for closed in [s for s in self._lingering if self._gone(s)]:
                del self._lingering[closed]
        while len(self._lingering) > MAX_LINGERING:
            await self._drop(next(iter(self._lingering)))

    def _gone(self, stream_id: int) -> bool:
        stream = self.streams.get(stream_id)
        return stream is None or stream.closed

    async def _drop(self, stream_id: int) -> None:
        """Reset a lingering stream and drop what it holds."""
        self._lingering.pop(stream_id, None)
        if self._gone(stream_id):
            return
        buffer = self.stream_buffers.get(stream_id)
        if buffer is not None:
            buffer.clear()
        with contextlib.suppress(Exception):  # the connection may be going down as well
            await self.streams[stream_id].reset()

    async def _reap_lingering(self) -> None:
        while True:
            await trio.sleep(REAP_EVERY_S)
            cutoff = trio.current_time() - LINGER_S
            for sid in [s for s, since in self._lingering.items() if since <= cutoff]:
                await self._drop(sid)


MAX_ADDRS_PER_PEER = 32
MAX_PROTOCOLS_PER_PEER = 64
MAX_RECORD_BYTES = 8 * 1024
"""A signed peer record listing `MAX_ADDRS_PER_PEER` addresses takes about 2 KiB."""


class CappedPeerStore(PeerStore):
    """py-libp2p's peer store, keeping only a peer's newest addresses and protocol names."""

    def add_addrs(self, peer_id: ID, addrs: Sequence[Multiaddr], ttl: int = 0) -> None:
        # Trimmed before py-libp2p's de-duplication, which compares each new address with all.
        super().add_addrs(peer_id, list(addrs)[-MAX_ADDRS_PER_PEER:], ttl)
        data = self.peer_data_map.get(peer_id)
        if data is not None:
            del data.addrs[:-MAX_ADDRS_PER_PEER]

    def add_protocols(self, peer_id: ID, protocols: Sequence[str]) -> None:
        super().add_protocols(peer_id, list(protocols)[-MAX_PROTOCOLS_PER_PEER:])
        del self.peer_data_map[peer_id].protocols[:-MAX_PROTOCOLS_PER_PEER]

    def set_protocols(self, peer_id: ID, protocols: Sequence[str]) -> None:
        super().set_protocols(peer_id, list(protocols)[-MAX_PROTOCOLS_PER_PEER:])

    def consume_peer_record(self, envelope: Envelope, ttl: int) -> bool:
        if len(envelope.raw_payload) > MAX_RECORD_BYTES:
            return False
        return super().consume_peer_record(envelope, ttl)


class _WindowedMuxerMultistream(MuxerMultistream):
    """Muxer negotiation that builds the muxer class it was given.

    py-libp2p's own builds a plain `Yamux` whenever yamux is agreed, whatever class was
    registered for it, so the registration alone would not put `WindowedYamux` in use."""

    on_violation: Callable[[ID], None] = staticmethod(lambda peer: None)
    """Given to every `WindowedYamux` it builds (`protocol.host.Host` sets it)."""

    async def new_conn(self, conn: ISecureConn, peer_id: ID) -> IMuxedConn:
        protocol, muxer_class = await self._selector.select(
            conn, conn.is_initiator, self.negotiate_timeout
        )
        muxer = muxer_class(conn, peer_id, on_violation=self.on_violation)
        return self._annotate_connection(muxer, conn, protocol)


def buffered_bytes(host: IHost) -> int:
    """Bytes that peers sent and nobody has read yet, in every stream of `host`'s connections."""
    total = 0
    for conns in host.get_network().connections.values():
        for conn in conns if isinstance(conns, list) else [conns]:
            total += sum(len(b) for b in conn.muxed_conn.stream_buffers.values())
    return total


def resource_manager(ceiling: int) -> ResourceManager:
    """py-libp2p's resource manager as it makes one by default, but for its cap on established
    connections: 256 inbound by default, so a host meant to keep 300 stopped at 256, closing the
    newcomer after its handshake before `InboundConnections` could make room (measured:
    `bench/slot_hog.py`, every newcomer shut out by 256 idle identities). `InboundConnections`
    enforces the host's own counts; py-libp2p's stop at `ceiling`, where they cannot bind first."""
    limits = ConnectionLimits(
        max_established_inbound=ceiling,
        max_established_outbound=ceiling,
        max_established_total=ceiling,
        max_established_per_peer=8,  # py-libp2p's default; our hosts keep 1 per peer anyway
    )
    return new_resource_manager(connection_limits=limits)


def new_host(key_pair: KeyPair, inbound: InboundLimits | None = None, **kwargs: Any) -> IHost:
    """py-libp2p's `new_host`, offering Noise and `WindowedYamux` only, on a `CappedPeerStore`
    (see the module's docstring), its inbound connections counted by `InboundConnections`
    (the swarm's `inbound_connections`); `kwargs` go to `libp2p.new_host` as they are."""
    muxers = {TProtocol(YAMUX_PROTOCOL_ID): WindowedYamux}
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    inbound = inbound or InboundLimits()
    connections = kwargs.get("connection_config") or ConnectionConfig()
    host = libp2p.new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt=muxers,
        peerstore_opt=CappedPeerStore(),
        resource_manager=resource_manager(inbound.ceiling(connections.max_connections)),
        **kwargs,
    )
    upgrader = host.get_network().upgrader
    upgrader.muxer_multistream = _WindowedMuxerMultistream(
        muxers, upgrader.muxer_multistream.negotiate_timeout
    )
    swarm = host.get_network()
    swarm.inbound_connections = InboundConnections(swarm, inbound)
    swarm.inbound_connections.install()
    return host


__all__ = [
    "LINGER_S",
    "MAX_ADDRS_PER_PEER",
    "MAX_LINGERING",
    "MAX_PROTOCOLS_PER_PEER",
    "MAX_RECORD_BYTES",
    "CappedPeerStore",
    "ReceiveWindowExceeded",
    "WindowedYamux",
    "buffered_bytes",
    "new_host",
]
