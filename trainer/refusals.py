"""Rate refusals per peer: counted in memory, written to the ledger every few seconds.

The transport's rate limiter (protocol.host) answers a flood for about a millisecond a request;
a SQLite write per refusal would cost the flood's target far more than the flood. So refusals are
tallied here and flushed in one transaction now and then: what each identity was refused becomes
part of what it cost the pool (`Ledger.contributions`), survives a restart, and tells an operator
(or the simulated swarm's report) who floods, from the coordinator's own view."""

from __future__ import annotations

from collections import Counter

import trio

from protocol.errors import ProtocolError
from protocol.host import public_key_of_peer
from trainer.ledger import Ledger

FLUSH_EVERY_S = 5.0
MAX_PEERS = 4096
"""Distinct peers tallied between two flushes. A thousand free identities flooding at once can
grow the tally no further; past it a new peer's refusals go uncounted (the host still refuses
them, and counts them in its totals)."""


class RefusalTally:
    """Rate refusals per peer id since the last `drain`."""

    def __init__(self, max_peers: int = MAX_PEERS) -> None:
        self.max_peers = max_peers
        self._counts: Counter[str] = Counter()

    def add(self, peer_id: str) -> None:
        if peer_id in self._counts or len(self._counts) < self.max_peers:
            self._counts[peer_id] += 1

    def drain(self) -> dict[bytes, int]:
        """The counts so far, by node key (peer ids that name no ed25519 key are dropped), and
        a fresh start."""
        counts, self._counts = self._counts, Counter()
        out: dict[bytes, int] = {}
        for peer_id, n in counts.items():
            try:
                out[public_key_of_peer(peer_id)] = n
            except ProtocolError:
                continue
        return out


async def record_refusals_forever(
    tally: RefusalTally, ledger: Ledger, every_s: float = FLUSH_EVERY_S
) -> None:
    """Add each peer's refusals to its ledger row (peers that never joined have none)."""
    while True:
        await trio.sleep(every_s)
        counts = tally.drain()
        if counts:
            ledger.add_rate_refusals(counts)
