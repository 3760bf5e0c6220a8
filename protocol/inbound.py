"""Inbound libp2p connections: each holds a slot from its accept until it closes, in all and
per address.

py-libp2p 0.8 takes one slot of its inbound cap (`max_connections - min_connections`, 300 for
our hosts) per accepted connection and gives it back only when the whole swarm stops: its
handler waits for the swarm after the upgrade, whether or not the connection still exists.
Measured with a real host: after 300 connections had come and gone (none open), every new one
was refused, for good. Honest churn (nodes reconnecting, dial-backs, probes) ends there within
hours; a stranger gets there in minutes (`bench/muxer_flood.py`). Nothing counted how
many connections one address holds either: only how fast it opens them.

`InboundConnections` replaces the swarm's inbound handler. A connection takes a slot before its
security handshake and gives it back when it closes (or its upgrade fails); past `per_address`
for one address (an IPv6 /64 counts as one, as for rates) a new connection is closed before
the handshake. When the host holds all the connections it may, a newcomer from an address
holding few makes room by closing the newest connection of the address holding the most (if
that is more than one above the newcomer's): a few addresses cannot fill the host and keep the
rest of the internet out, and nobody is evicted for a peer no better off than itself. Loopback
is exempt when asked: the simulated swarm runs every process on 127.0.0.1.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


class InboundConnections:
    """The swarm's inbound handler, counting each connection until it closes (see the
    module's docstring). `refused` counts connections closed for want of a slot."""

    def __init__(self, swarm: Any, limits: InboundLimits) -> None:
        self.swarm = swarm
        self.limits = limits
        self.total = swarm.connection_config.max_connections
        self.held: Counter[str] = Counter()
        """Slots held per address ("" for exempt and unknown ones), handshakes included."""
        self.conns: dict[str, list[Any]] = {}
        """Each address's registered connections, oldest first (what eviction closes)."""
        self.refused = 0
        self.evicted = 0
        self.on_refuse: Callable[[], None] = lambda: None
        """Called for each connection closed for want of a slot (a host's metrics)."""
        self._original = swarm._handle_inbound_connection

    @property
    def open(self) -> int:
        """Inbound connections holding a slot now."""
        return sum(self.held.values())

    def install(self) -> None:
        self.swarm._handle_inbound_connection = self.handle

    async def handle(self, stream: Any, listen_addr: Any) -> None:
        if isinstance(stream, IMuxedConn):  # QUIC and the like: not a transport of ours
            await self._original(stream, listen_addr)
            return
        key = self._key(stream)
        if not await self._take(key):
            self.refused += 1
            self.on_refuse()
            await close_quietly(stream, reset=False)
            return
        try:
            await self._serve(stream, listen_addr, key)
        finally:
            self._release(key)

    async def _take(self, key: str | None) -> bool:
        """A slot for a connection from `key`: within its address's share, and within the
        host's connections, making room when full by closing the newest connection of the
        address that holds the most, if that is more than one above what `key` holds."""
        if key is not None and self.held[key] >= self.limits.per_address:
            return False
        if self._full():
            victim = self._evictable(key)
            if victim is None:
                return False
            self.evicted += 1
            await close_quietly(victim, reset=False)  # its own handler gives its slot back
        self.held[key or ""] += 1
        return True

    def _full(self) -> bool:
        # py-libp2p counts outbound connections against the same limit in its upgrade.
        return max(self.open, len(self.swarm.get_connections())) >= self.total

    def _evictable(self, key: str | None) -> Any:
        """The newest connection of the address holding the most, if it holds more than one
        above `key`; never for or from an exempt (loopback) address."""
        if key is None:
            return None
        counted = [k for k, conns in self.conns.items() if k != "" and conns]
        top = max(counted, key=lambda k: len(self.conns[k]), default=None)
        if top is None or len(self.conns[top]) <= self.held[key] + 1:
            return None
        return self.conns[top][-1]

    async def _serve(self, stream: Any, listen_addr: Any, key: str | None) -> None:
        remote = self.swarm._build_remote_multiaddr(stream)
        if remote is not None and not await self.swarm.connection_gate.is_allowed(remote):
            await close_quietly(stream, reset=False)
            return
        raw = RawConnection(stream, False)
        try:
            muxed = await self.swarm.upgrade_inbound_raw_conn(raw, listen_addr)
        except Exception as e:  # py-libp2p raises whatever the handshake or the socket gave
            log.debug("inbound connection not upgraded: %s", e)
            await close_quietly(raw, reset=False)
            return
        conn = self._registered(muxed)
        if conn is None:  # closed already, or never registered: nothing else will close it
            await close_quietly(muxed, reset=False)
            return
        held = self.conns.setdefault(key or "", [])
        held.append(conn)
        try:
            await conn.event_closed.wait()
        finally:
            held.remove(conn)
            if not held:
                del self.conns[key or ""]

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


__all__ = ["InboundConnections", "InboundLimits", "connection_key"]
