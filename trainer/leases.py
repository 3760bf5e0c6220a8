"""What goes into a lease: prompts a node cannot choose, and seeds it cannot re-roll.

A lease's prompts are hashes of (pool seed, node key, lease counter, slot), fixed before the
node asks and reproducible by anyone auditing the ledger. A task's sampling seed is a hash of
(pool seed, prompt, draw), where the prompt's draw counter (kept in the ledger) advances each
time the prompt is handed out: the same prompt never comes with the same seed twice, and the
seed does not depend on who asks. Prompts of leases that expired or were released go to the
next leases first, but never back to the node that gave them up inside the admission window,
so releasing a lease cannot buy a node a second roll of the same prompt.
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


def task_seed(pool_seed: int, prompt_index: int, draw_number: int) -> int:
    """The sampling seed of the `draw_number`-th handing out of a prompt (sample i of the
    group uses index i under it)."""
    return _hash64(b"seed", struct.pack(">qQQ", pool_seed, prompt_index, draw_number))


@dataclass(frozen=True)
class _Orphan:
    prompt_index: int
    barred: bytes | None
    """The node that gave it up: it may not get it back before `until`."""
    until: float


class LeaseBook:
    """Plans the prompts of each new lease."""

    def __init__(self, pool_seed: int, n_prompts: int) -> None:
        if n_prompts < 1:
            raise ValueError("the task has no training prompts")
        self.pool_seed = pool_seed
        self.n_prompts = n_prompts
        self._orphans: deque[_Orphan] = deque()

    def return_prompts(
        self, prompt_indices: list[int], barred: bytes | None = None, until: float = 0.0
    ) -> None:
        """Prompts of an expired, released or revoked lease: they go to the next leases, except
        to `barred` (the node that gave them up) before `until`."""
        self._orphans.extend(_Orphan(p, barred, until) for p in prompt_indices)

    @property
    def orphan_count(self) -> int:
        return len(self._orphans)

    def plan(self, node: bytes, counter: int, n_tasks: int, now: float) -> list[int]:
        """Prompt indices for `node`'s lease number `counter`: orphans it may take first, then
        fresh draws."""
        taken = self._take_orphans(node, n_tasks, now)
        fresh = [
            draw(self.pool_seed, node, counter, slot, b"prompt") % self.n_prompts
            for slot in range(len(taken), n_tasks)
        ]
        return taken + fresh

    def _take_orphans(self, node: bytes, n: int, now: float) -> list[int]:
        taken: list[int] = []
        kept: deque[_Orphan] = deque()
        while self._orphans and len(taken) < n:
            o = self._orphans.popleft()
            if o.barred == node and now < o.until:
                kept.append(o)
            else:
                taken.append(o.prompt_index)
        kept.extend(self._orphans)
        self._orphans = kept
        return taken
