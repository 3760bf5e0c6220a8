"""Inbound libp2p connections: slots for handshakes, slots for connections, and who gives way
when they are full.

py-libp2p 0.8 takes one slot of its inbound cap (`max_connections - min_connections`, 300 for
our hosts) per accepted connection and gives it back only when the whole swarm stops: its
handler waits for the swarm after the upgrade, whether or not the connection still exists.
Measured with a real host: after 300 connections had come and gone (none open), every new one
was refused, for good. Honest churn (nodes reconnecting, dial-backs, probes) ends there within
hours; a stranger gets there in minutes (`bench/muxer_flood.py`).

`InboundConnections` replaces the swarm's inbound handler and holds three rules:

- **Per address.** An address (an IPv6 /64 counts as one, as for rates) holds at most
  `per_address` connections, handshakes included; past that a new one is closed before the
  handshake. Loopback is exempt when asked: the simulated swarm runs every process on 127.0.0.1.
- **Handshakes have slots of their own** (`handshakes`). A connection in its security handshake
  does not hold one of the host's connection slots: one process holding 600 silent TCP sockets
  kept every honest peer out of a host that counted them there (measured: every new peer
  refused, `tests/protocol/test_inbound.py`). Past `handshakes`, a newcomer closes the oldest
  handshake that has sent nothing, else the oldest: an honest peer speaks first and finishes in
  a few round trips; a silent one waits for py-libp2p's upgrade timeout.
- **Connections.** Once a newcomer is through its handshake its peer is known. When the host
  then holds more than it may, one connection of a stranger (a peer `preferred` does not name)
  is closed: the one that went longest without being served or doing a service (`touch`: a
  request answered on a pool route or a SHARDCAST stream, an announcement it was first to
  forward that passed our checks; refused requests do not count). A stranger gives way to
  another stranger only after `grace_s`, time for its first request. A preferred peer (the
  coordinator's trusted nodes, a node's coordinator) is never closed for anyone, and gets in
  whenever some stranger holds a slot. When nobody may give way, the newcomer is closed. So
  connections that hold a slot and do nothing cannot keep anyone out, and strangers, however
  many and however busy, cannot keep out members.
"""

from __future__ import annotations

import array
import enum
import fcntl
import logging
import termios
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IMuxedConn
from libp2p.network.connection.raw_connection import RawConnection

from protocol.host import close_quietly
from protocol.ratelimit import client_key, is_loopback

log = logging.getLogger(__name__)


def connection_key(stream: Any, exempt_loopback: bool) -> str | None:
    """Whom an inbound connection counts against (its address, an IPv6 /64 as one), or None
    for an exempt or unknown address: the key of the connection rate and of held slots."""
    remote = stream.get_remote_address() if hasattr(stream, "get_remote_address") else None
    if not remote:
        return None
    if exempt_loopback and is_loopback(remote[0]):
        return None
    return client_key(remote[0])


@dataclass(frozen=True)
class InboundLimits:
    per_address: int = 32
    """Inbound connections one address may hold at once, handshakes included: an honest node
    holds one per host it talks to, so this leaves room for many nodes behind one NAT."""
    exempt_loopback: bool = True
    handshakes: int = 64
    """Inbound connections in their security handshake at once (on top of the host's
    connection slots, py-libp2p's `max_connections`)."""
    grace_s: float = 2.0
    """A stranger's connection younger than this never gives way to another stranger: time for
    its first request."""

    def ceiling(self, connections: int) -> int:
        """Connections py-libp2p must let through for a host keeping `connections`: those plus
        the handshakes, which this handler may make room for after they finish."""
        return connections + self.handshakes

    def __post_init__(self) -> None:
        if self.per_address < 1 or self.handshakes < 1 or self.grace_s < 0:
            raise ValueError(f"inbound limits must allow a connection: {self}")


class Closed(enum.Enum):
    """Why `InboundConnections` closed an inbound connection (its `on_close` hook)."""

    REFUSED = "refused"
    """No slot for it: its address holds its share, or the host is full and nobody gives way."""
    EVICTED = "evicted"
    """A stranger's, closed to make room for a newcomer."""
    HANDSHAKE_CUT = "handshake_cut"
    """In its handshake, closed to make room for a newer one."""


class _CountingRaw(RawConnection):
    """A raw connection that tells whether its peer has sent anything (during its handshake)."""

    _read = False

    async def read(self, n: int | None = None) -> bytes:
        data = await super().read(n)
        self._read = self._read or bool(data)
        return data

    @property
    def spoke(self) -> bool:
        """Whether the peer sent a byte: one we read, or one waiting in the socket that our
        handshake has not come to yet (a busy host reads late, and an honest newcomer must
        not look silent meanwhile)."""
        return self._read or _waiting(self.stream)


def _waiting(stream: Any) -> bool:
    """Whether bytes wait unread in `stream`'s socket (py-libp2p's TCP stream), asked of the
    kernel (FIONREAD) without taking them; False for any other kind of stream."""
    sock = getattr(getattr(stream, "stream", None), "socket", None)
    if sock is None:
        return False
    unread = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, unread)
    except (OSError, ValueError):  # closed already: nothing to protect
        return False
    return unread[0] > 0


@dataclass
class _Held:
    conn: Any
    since: float
    active: float
    """When its peer was last served a request (or when it was registered)."""

    @property
    def peer_id(self) -> str:
        return str(self.conn.muxed_conn.peer_id)


class InboundConnections:
    """The swarm's inbound handler (see the module's docstring). `refused` counts connections
    closed for want of a slot, `evicted` those closed to make room, `handshakes_cut` handshakes
    closed to make room for newer ones."""

    def __init__(self, swarm: Any, limits: InboundLimits) -> None:
        self.swarm = swarm
        self.limits = limits
        self.total = swarm.connection_config.max_connections
        """Connections (inbound and outbound, handshakes not counted) the host keeps."""
        # py-libp2p refuses a connection at its own max before and after the handshake; it
        # must let through the ones this handler may make room for. Its pruner, past the high
        # watermark, would close idle connections whoever holds them: never.
        config = swarm.connection_config
        config.max_connections = config.high_watermark = limits.ceiling(self.total)
        self.held: Counter[str] = Counter()
        """Slots held per address ("" for exempt and unknown ones), handshakes included."""
        self.handshaking: dict[_CountingRaw, float] = {}
        """Connections in their handshake, oldest first, with when it began."""
        self.registered: dict[Any, _Held] = {}
        """Inbound connections through their handshake, by muxed connection."""
        self.preferred: Callable[[str], bool] = lambda peer_id: False
        """Peers (by peer id) whose connections are never closed to make room."""
        self.refused = 0
        self.evicted = 0
        self.handshakes_cut = 0
        self.on_close: Callable[[Closed], None] = lambda why: None
        """Called for each connection this handler closes, with why (a host's metrics)."""
        self._original = swarm._handle_inbound_connection

    @property
    def open(self) -> int:
        """Inbound connections holding a slot now, handshakes included."""
        return sum(self.held.values())

    def install(self) -> None:
        self.swarm._handle_inbound_connection = self.handle

    def touch(self, muxed_conn: Any) -> None:
        """Note that the peer of `muxed_conn` was served a request (a pool route, a SHARDCAST
        stream: whoever answers it calls this)."""
        held = self.registered.get(muxed_conn)
        if held is not None:
            held.active = trio.current_time()

    def touch_peer(self, peer_id: str) -> None:
        """Note that `peer_id` did this host a service on whichever connection it holds (it
        was the first to forward an announcement that passed our checks)."""
        now = trio.current_time()
        for held in self.registered.values():
            if held.peer_id == peer_id:
                held.active = now

    async def handle(self, stream: Any, listen_addr: Any) -> None:
        if isinstance(stream, IMuxedConn):  # QUIC and the like: not a transport of ours
            await self._original(stream, listen_addr)
            return
        key = self._key(stream)
        if key is not None and self.held[key] >= self.limits.per_address:
            await self._refuse(stream)
            return
        raw = _CountingRaw(stream, False)
        # The slot is taken in the same step as the check, so handlers arriving together
        # cannot each see room and overfill the handshakes.
        cut = self._cut_for(raw)
        self.held[key or ""] += 1
        try:
            if cut is not None:
                await close_quietly(cut, reset=False)  # its own handler gives its slot back
            await self._serve(raw, listen_addr)
        finally:
            self._release(key)

    async def _refuse(self, conn: Any) -> None:
        self.refused += 1
        self.on_close(Closed.REFUSED)
        await close_quietly(conn, reset=False)

    def _cut_for(self, raw: _CountingRaw) -> _CountingRaw | None:
        """Take a handshake slot for `raw`; when all are taken, free the one of the oldest
        handshake whose peer has sent nothing, else of the oldest, and return it to close."""
        cut = None
        if len(self.handshaking) >= self.limits.handshakes:
            silent = [held for held in self.handshaking if not held.spoke]
            cut = silent[0] if silent else next(iter(self.handshaking))
            del self.handshaking[cut]
            self.handshakes_cut += 1
            self.on_close(Closed.HANDSHAKE_CUT)
        self.handshaking[raw] = trio.current_time()
        return cut

    async def _serve(self, raw: _CountingRaw, listen_addr: Any) -> None:
        try:
            remote = self.swarm._build_remote_multiaddr(raw.stream)
            if remote is not None and not await self.swarm.connection_gate.is_allowed(remote):
                await close_quietly(raw, reset=False)
                return
            muxed = await self.swarm.upgrade_inbound_raw_conn(raw, listen_addr)
        except Exception as e:  # py-libp2p raises whatever the handshake or the socket gave
            log.debug("inbound connection not upgraded: %s", e)
            await close_quietly(raw, reset=False)
            return
        finally:
            self.handshaking.pop(raw, None)
        conn = self._registered(muxed)
        if conn is None:  # closed already, or never registered: nothing else will close it
            await close_quietly(muxed, reset=False)
            return
        now = trio.current_time()
        held = self.registered[muxed] = _Held(conn, since=now, active=now)
        try:
            if await self._room_for(held):
                await conn.event_closed.wait()
        finally:
            del self.registered[muxed]

    async def _room_for(self, newcomer: _Held) -> bool:
        """Whether `newcomer` keeps its connection, closing another to make room if the host
        holds more than it may (see the module's docstring)."""
        if len(self.swarm.get_connections()) <= self.total:
            return True
        victim = self._victim(newcomer, self.preferred(newcomer.peer_id))
        if victim is None:
            await self._refuse(newcomer.conn)
            return False
        self.evicted += 1
        self.on_close(Closed.EVICTED)
        log.info("closed %s's connection to make room for %s", victim.peer_id, newcomer.peer_id)
        await close_quietly(victim.conn, reset=False)  # its own handler forgets it
        return True

    def _victim(self, newcomer: _Held, member: bool) -> _Held | None:
        """The stranger's connection that went longest without a `touch`, among those
        a newcomer (a `member` or not) may close."""
        now = trio.current_time()
        eligible = [
            held
            for held in self.registered.values()
            if held is not newcomer
            and not held.conn.is_closed
            and (member or now - held.since >= self.limits.grace_s)
        ]
        # Idlest first, and `preferred` (a ledger query on the coordinator) asked lazily.
        eligible.sort(key=lambda held: held.active)
        return next((held for held in eligible if not self.preferred(held.peer_id)), None)

    def _registered(self, muxed: Any) -> Any:
        conns = self.swarm.connections.get(muxed.peer_id) or []
        for conn in conns if isinstance(conns, list) else [conns]:
            if conn.muxed_conn is muxed and not conn.is_closed:
                return conn
        return None

    def _key(self, stream: Any) -> str | None:
        return connection_key(stream, self.limits.exempt_loopback)

    def _release(self, key: str | None) -> None:
        self.held[key or ""] -= 1
        if self.held[key or ""] <= 0:
            del self.held[key or ""]  # keep the table as small as the connections open


__all__ = ["Closed", "InboundConnections", "InboundLimits", "connection_key"]
