"""The points where a node decides how to act, as one overridable class, and the narrow view of
the running node (`NodeContext`) that a behaviour gets.

The honest node uses `Behaviour` as it is. The simulated swarm's cheating nodes
(`examples/byzantine.py`) subclass it, so each cheat is the real node code with one
behaviour changed, and the coordinator is tested against exactly what a cheater could do.
A behaviour sees the node through `NodeContext` only: what it needs to act (its identity, the
pool, a way to call the coordinator), never the worker's internals.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from protocol import messages as msg

if TYPE_CHECKING:
    from node.engine import Engine
    from node.worker import NodeStats
    from protocol.host import Host
    from protocol.identity import Identity
    from protocol.poolspec import PoolSpec


@dataclass(frozen=True)
class NodeContext:
    """What a behaviour may use of the running node."""

    identity: Identity
    pool_id: str
    spec: PoolSpec
    engine: Engine
    stats: NodeStats
    call: Callable[[str, msg.Message, type[Any], float], Awaitable[Any]]
    """Send a signed request to the coordinator at once (the worker's own requests are paced
    under the pool's rate; a behaviour's are not) and return its (verified) reply."""
    lease: Callable[[], msg.Lease | None]
    """The lease being worked on now, if any."""
    rejoin: Callable[[str], Awaitable[msg.JoinReply]]
    """Join again (idempotent), advertising the given relay URL ("" for none)."""
    release: Callable[[int], Awaitable[str]]
    """Give a lease back; returns the receipt's code."""
    stop: Callable[[], None]
    """Finish the current lease, then leave."""
    host: Host
    """The libp2p host itself, for behaviours that speak below the message layer."""
    coordinator_addrs: Callable[[], list[str]]
    """The coordinator's current addresses (they change when discovery runs again)."""


class Behaviour:
    name = "honest"

    def on_load(self, engine: Engine, version: int) -> None:
        """Called after the engine loaded weights `version` (in a worker thread)."""

    def choose_version(self, held: list[int], loaded: int) -> int | None:
        """Which held version to swap to between leases; None keeps the loaded one."""
        return held[-1] if held and held[-1] > loaded else None

    def generate(self, engine: Engine, lease: msg.Lease) -> list[msg.TaskResult]:
        """Turn a lease into results (in a worker thread)."""
        return engine.generate(lease)

    def submissions(self, submission: msg.Submission, lease: msg.Lease) -> list[msg.Submission]:
        """What to send for a finished lease, in order (none: the lease is left to expire)."""
        return [submission]

    async def alongside(self, ctx: NodeContext) -> None:
        """Runs beside the worker loop for the node's lifetime; it starts before the first
        lease is asked for."""
