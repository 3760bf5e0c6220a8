"""Which addresses a member's libp2p swarm may dial.

py-libp2p dials a peer at every address its peerstore holds for it, and identify fills the
peerstore with whatever the peer reports about itself (replacing the addresses we dialled it
at). A hostile peer could so aim our next dial to it (a stream opened after it dropped the
connection, a reconnect) at this machine's loopback or its LAN: a TCP connection and a
multistream handshake sent wherever it likes, one report per target, the same class as the
gossip and hole-punch rules in `shardcast.scope`.

The gate lets a dial reach the addresses the caller of `connect` named (our code: bootstrap
peers, the signed pool record, relay hops) and any other address only when it is no nearer
than the member's relay hops (`scope.may_dial` under `scope.dial_floor`, the DCUtR rule).
Inbound connections pass as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from libp2p.network.connection_gate import ConnectionGate
from multiaddr import Multiaddr

from shardcast.scope import Scope, may_dial

log = logging.getLogger("swarmrl.shardcast.dialgate")

_OUTBOUND: ContextVar[bool] = ContextVar("swarmrl_dial_outbound", default=False)
"""Set while the swarm dials (`Swarm.dial_peer`): the gate's check is then for a dial."""
_NAMED: ContextVar[frozenset[str]] = ContextVar("swarmrl_dial_named", default=frozenset())
"""The addresses the running `connect` call was given."""


def _bare(addr: Any) -> str:
    """`addr` without its trailing `/p2p/<id>`, as the peerstore keeps it."""
    return str(addr).split("/p2p/")[0]


class DialGate(ConnectionGate):
    """py-libp2p's connection gate, with our rule for outbound dials (`gate_dials`)."""

    def __init__(self, floor: Callable[[], Scope]) -> None:
        super().__init__()
        self.floor = floor
        self.refused = 0
        """Dials refused so far (a count for tests and logs)."""

    async def is_allowed(self, remote_addr: Multiaddr) -> bool:
        if not _OUTBOUND.get():
            return await super().is_allowed(remote_addr)
        text = str(remote_addr)
        # A circuit address goes through a relay hop, which the swarm never dials itself.
        if _bare(text) in _NAMED.get() or "/p2p-circuit" in text:
            return True
        if may_dial(text, self.floor()):
            return True
        self.refused += 1
        log.info("not dialling %s: a peer's own report, nearer than this pool reaches", text)
        return False


def gate_dials(raw: Any, floor: Callable[[], Scope]) -> DialGate:
    """Put `raw`'s outbound dials behind a `DialGate` whose floor is `floor()`; a second
    call on the same host only replaces the floor."""
    swarm = raw.get_network()
    if isinstance(swarm.connection_gate, DialGate):
        swarm.connection_gate.floor = floor
        return swarm.connection_gate
    gate = DialGate(floor)
    swarm.connection_gate = gate
    dial_peer, connect = swarm.dial_peer, raw.connect

    async def gated_dial_peer(peer_id: Any) -> Any:
        token = _OUTBOUND.set(True)
        try:
            return await dial_peer(peer_id)
        finally:
            _OUTBOUND.reset(token)

    async def naming_connect(peer_info: Any) -> None:
        token = _NAMED.set(frozenset(_bare(a) for a in peer_info.addrs))
        try:
            await connect(peer_info)
        finally:
            _NAMED.reset(token)

    swarm.dial_peer = gated_dial_peer
    raw.connect = naming_connect
    return gate
