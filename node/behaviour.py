"""The points where a node decides how to act, as one overridable class.

The honest node uses `Behaviour` as it is. The simulated swarm's cheating nodes
(`examples/byzantine.py`) subclass it, so each cheat is the real node code with one
behaviour changed, and the coordinator is tested against exactly what a cheater could do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol import messages as msg

if TYPE_CHECKING:
    from node.engine import Engine
    from node.worker import Worker


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
        """What to send for a finished lease, in order."""
        return [submission]

    async def alongside(self, worker: Worker) -> None:
        """Runs beside the worker loop for the node's lifetime."""
