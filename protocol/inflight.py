"""Bytes in flight: how much request data a host has agreed to hold, per peer and in total.

A frame's declared length is reserved when its header arrives, before a byte of its body is
read, and released when the request is done (answered, refused or failed). A frame that would
take a peer, or the whole host, past its budget is refused unread. So what strangers and members
can make a host buffer at once is bounded by the two numbers here, however many streams or
identities they open.

The per-peer table holds only peers with bytes in flight right now (an entry goes when its count
reaches zero), so it never outgrows the number of open streams.
"""

from __future__ import annotations

from typing import Literal

Scope = Literal["peer", "total"]


class OverBudget(Exception):
    """A reservation would exceed the peer's budget (`scope="peer"`) or the host's."""

    def __init__(self, scope: Scope, wanted: int, held: int, budget: int) -> None:
        super().__init__(
            f"{wanted} more bytes would make {held + wanted} in flight "
            f"{'from this peer' if scope == 'peer' else 'in total'}, above {budget}"
        )
        self.scope = scope


class InflightBudget:
    """Byte reservations against a per-peer and a total budget."""

    def __init__(self, per_peer: int, total: int) -> None:
        if not 0 < per_peer <= total:
            raise ValueError(f"need 0 < per_peer <= total, got {per_peer} and {total}")
        self.per_peer = per_peer
        self.total = total
        self.held = 0
        self._by_peer: dict[str, int] = {}

    def held_by(self, peer: str) -> int:
        return self._by_peer.get(peer, 0)

    def reserve(self, peer: str, n: int) -> None:
        """Reserve `n` bytes for `peer`, or raise `OverBudget`; pair with `release`."""
        mine = self.held_by(peer)
        # The peer's own budget first: a peer over it is told so, whatever the host's load.
        if mine + n > self.per_peer:
            raise OverBudget("peer", n, mine, self.per_peer)
        if self.held + n > self.total:
            raise OverBudget("total", n, self.held, self.total)
        self._by_peer[peer] = mine + n
        self.held += n

    def release(self, peer: str, n: int) -> None:
        """Give back `n` bytes that `reserve` granted to `peer`."""
        self.held -= n
        left = self._by_peer[peer] - n
        if left:
            self._by_peer[peer] = left
        else:
            del self._by_peer[peer]

    def __len__(self) -> int:
        """Peers with bytes in flight now."""
        return len(self._by_peer)
