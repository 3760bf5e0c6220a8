"""What goes into a lease: prompts drawn so a node cannot choose them, and per-task seeds.

Prompt indices and sampling seeds are hashes of (pool seed, node key, lease counter, slot), so
they are fixed before the node asks and reproducible by anyone auditing the ledger; a node
cannot pick easy prompts or favourable seeds. Tasks of leases that expired or were released are
handed out first to the next lease, to any node, with a fresh seed.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

import blake3


def _hash64(*parts: bytes) -> int:
    h = blake3.blake3()
    for p in parts:
        h.update(struct.pack(">I", len(p)))
        h.update(p)
    return int.from_bytes(h.digest(8), "big") >> 1  # 63 bits: fits a signed int64


def draw(pool_seed: int, node: bytes, counter: int, slot: int, what: bytes) -> int:
    return _hash64(what, struct.pack(">q", pool_seed), node, struct.pack(">QQ", counter, slot))


@dataclass(frozen=True)
class PlannedTask:
    prompt_index: int
    seed: int


class LeaseBook:
    """Plans the tasks of each new lease."""

    def __init__(self, pool_seed: int, n_prompts: int, tasks_per_lease: int) -> None:
        if n_prompts < 1:
            raise ValueError("the task has no training prompts")
        self.pool_seed = pool_seed
        self.n_prompts = n_prompts
        self.tasks_per_lease = tasks_per_lease
        self._orphans: deque[int] = deque()

    def return_prompts(self, prompt_indices: list[int]) -> None:
        """Prompts of an expired, released or revoked lease: they go to the next leases."""
        self._orphans.extend(prompt_indices)

    @property
    def orphan_count(self) -> int:
        return len(self._orphans)

    def plan(self, node: bytes, counter: int) -> list[PlannedTask]:
        tasks = []
        for slot in range(self.tasks_per_lease):
            seed = draw(self.pool_seed, node, counter, slot, b"seed")
            if self._orphans:
                index = self._orphans.popleft()
            else:
                index = draw(self.pool_seed, node, counter, slot, b"prompt") % self.n_prompts
            tasks.append(PlannedTask(index, seed))
        return tasks
