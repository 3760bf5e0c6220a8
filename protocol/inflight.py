"""Bytes in flight: how much request data a host has agreed to hold, per peer and in total.

A frame's declared length is reserved when its header arrives, before a byte of its body is
read, and released when the request is done (answered, refused or failed). A frame that would
take a peer, or the whole host, past its budget is refused unread. So what strangers and members
can make a host buffer at once is bounded by the two numbers here, however many streams or
identities they open.

Two rules keep one class of peers from taking the whole total:
- A route may draw a class of signers' frames from a `Share` they hold together (the
  coordinator's submit route puts every node on probation in one), so a thousand free keys
  hold what one share allows, not a thousand per-peer budgets.
- The last `small_reserve` bytes of the total are kept for frames of at most `small_frame`
  bytes (the host passes its control messages' limit: join, heartbeat, lease requests), so
  large frames cannot crowd out the small requests that keep honest nodes in the pool.

The per-peer and per-share tables hold only entries with bytes in flight right now (an entry
goes when its count reaches zero), so they never outgrow the number of open streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scope = Literal["peer", "share", "total"]


@dataclass(frozen=True)
class Share:
    """A budget the frames of a class of signers draw on together, on top of their own."""

    name: str
    budget: int


class OverBudget(Exception):
    """A reservation would exceed the peer's budget (`scope="peer"`), its share's, or the
    host's."""

    def __init__(self, scope: Scope, wanted: int, held: int, budget: int) -> None:
        whose = {"peer": "from this peer", "share": "from peers of its class", "total": "in total"}
        super().__init__(
            f"{wanted} more bytes would make {held + wanted} in flight {whose[scope]}, "
            f"above {budget}"
        )
        self.scope = scope


class InflightBudget:
    """Byte reservations against a per-peer, a per-share and a total budget."""

    def __init__(
        self, per_peer: int, total: int, small_reserve: int = 0, small_frame: int = 0
    ) -> None:
        if not 0 < per_peer <= total:
            raise ValueError(f"need 0 < per_peer <= total, got {per_peer} and {total}")
        if not 0 <= small_reserve < total:
            raise ValueError(f"need 0 <= small_reserve < total, got {small_reserve}")
        self.per_peer = per_peer
        self.total = total
        self.small_reserve = small_reserve
        self.small_frame = small_frame
        self.held = 0
        self._by_peer: dict[str, int] = {}
        self._by_share: dict[str, int] = {}

    def held_by(self, peer: str) -> int:
        return self._by_peer.get(peer, 0)

    def held_by_share(self, name: str) -> int:
        return self._by_share.get(name, 0)

    def reserve(self, peer: str, n: int, share: Share | None = None) -> None:
        """Reserve `n` bytes for `peer` (and its `share`), or raise `OverBudget`; pair with
        `release`."""
        mine = self.held_by(peer)
        # The peer's own budget first: a peer over it is told so, whatever the host's load.
        if mine + n > self.per_peer:
            raise OverBudget("peer", n, mine, self.per_peer)
        if share is not None:
            ours = self.held_by_share(share.name)
            if ours + n > share.budget:
                raise OverBudget("share", n, ours, share.budget)
        total = self.total if n <= self.small_frame else self.total - self.small_reserve
        if self.held + n > total:
            raise OverBudget("total", n, self.held, total)
        self._by_peer[peer] = mine + n
        if share is not None:
            self._by_share[share.name] = self.held_by_share(share.name) + n
        self.held += n

    def release(self, peer: str, n: int, share: Share | None = None) -> None:
        """Give back `n` bytes that `reserve` granted to `peer` (and its `share`)."""
        self.held -= n
        _take(self._by_peer, peer, n)
        if share is not None:
            _take(self._by_share, share.name, n)

    def __len__(self) -> int:
        """Peers with bytes in flight now."""
        return len(self._by_peer)


def _take(table: dict[str, int], key: str, n: int) -> None:
    left = table[key] - n
    if left:
        table[key] = left
    else:
        del table[key]
