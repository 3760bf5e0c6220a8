"""What goes into a lease: prompts a node cannot choose, and seeds it cannot re-roll.

A lease's prompts are hashes of (pool seed, node key, lease counter, slot), fixed before the
node asks and reproducible by anyone auditing the ledger. A task's sampling seed is a hash of
(pool seed, prompt, draw), where the prompt's draw counter (kept in the ledger) advances each
time the prompt is handed out: the same prompt never comes with the same seed twice, and the
seed does not depend on who asks. Prompts of leases that expired or were released go to the
next leases first, but never back to the node that gave them up inside the admission window,
so releasing a lease cannot buy a node a second roll of the same prompt; nor does a fresh draw
deal a node a prompt it holds in an open lease, while any other is free (two seeds of one
prompt at once are a re-roll too: it could submit the luckier and let the other expire). Both
sets come from the ledger at each lease, so they survive a restart and can be audited. A fresh
draw passes over prompts the curriculum (trainer/curriculum.py) turns down, by a coin anyone
can replay.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable

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


Keep = Callable[[int, int], bool]
"""keep(prompt index, slot draw): whether a fresh draw that reached this prompt leases it."""
MAX_SKIPS = 64
"""Prompts one fresh draw may pass over because `keep` turned them down."""


class NothingToLease(Exception):
    """Every prompt this node could be given is barred from it for now."""


class LeaseBook:
    """Plans the prompts of each new lease."""

    def __init__(self, pool_seed: int, n_prompts: int) -> None:
        if n_prompts < 1:
            raise ValueError("the task has no training prompts")
        self.pool_seed = pool_seed
        self.n_prompts = n_prompts
        self._orphans: deque[int] = deque()

    def return_prompts(self, prompt_indices: list[int]) -> None:
        """Prompts of an expired, released or revoked lease: they go to the next leases (to
        nodes they are not barred from)."""
        self._orphans.extend(prompt_indices)

    @property
    def orphan_count(self) -> int:
        return len(self._orphans)

    def plan(
        self,
        node: bytes,
        counter: int,
        n_tasks: int,
        keep: Keep | None = None,
        barred: frozenset[int] = frozenset(),
        held: frozenset[int] = frozenset(),
        size: Callable[[int], int] | None = None,
        samples: int = 0,
    ) -> list[int]:
        """Prompt indices for `node`'s lease number `counter`: orphans it may take first, then
        fresh draws. `barred`: prompts it gave up in the window, never dealt to it. `held`:
        prompts of its open leases, passed over (like those already in this lease) while
        another is free. Draws also pass over prompts `keep(prompt, slot draw)` turns down
        (trainer.curriculum). `size(prompt)`: its samples, when they vary; the lease then
        ends before the prompt that would take it past `samples` in all, so a lease is never
        more work than the pool's terms say, and a prompt of any size still fits in a lease
        of its own. Raises `NothingToLease` when none is left for it."""
        budget = Budget(samples, size) if size is not None else Budget(n_tasks, lambda p: 1)
        taken = self._take_orphans(barred, n_tasks, budget)
        if len(barred) < self.n_prompts:
            for slot in range(len(taken), n_tasks):
                start = draw(self.pool_seed, node, counter, slot, b"prompt")
                p = self._first_free(start, barred, held | set(taken), keep)
                if not budget.take(p):
                    break  # a fresh draw not taken is simply not dealt: nothing to give back
                taken.append(p)
        if not taken:
            raise NothingToLease(f"the {len(barred)} prompts this node gave up are barred from it")
        return taken

    def _first_free(
        self, start: int, barred: frozenset[int], held: frozenset[int], keep: Keep | None
    ) -> int:
        """The drawn prompt, or the next one after it that is neither barred nor held and
        that `keep` takes. After `MAX_SKIPS` turned down, the first one neither barred nor
        held (a pool of settled prompts still leases, and a draw costs a bounded walk); when
        every free prompt is held, the first free one (a pool smaller than a node's leases)."""
        first: int | None = None
        first_unheld: int | None = None
        skipped = 0
        for k in range(self.n_prompts):
            p = (start + k) % self.n_prompts
            if p in barred:
                continue
            if first is None:
                first = p
            if p in held:
                continue
            if first_unheld is None:
                first_unheld = p
            if keep is None or keep(p, start):
                return p
            skipped += 1
            if skipped == MAX_SKIPS:
                break
        if first is None:
            raise NothingToLease("every prompt is barred from this node")
        return first if first_unheld is None else first_unheld

    def _take_orphans(self, barred: frozenset[int], n: int, budget: Budget) -> list[int]:
        taken: list[int] = []
        kept: deque[int] = deque()
        while self._orphans and len(taken) < n:
            p = self._orphans.popleft()
            if p in barred:
                kept.append(p)
            elif budget.take(p):
                taken.append(p)
            else:
                self._orphans.appendleft(p)  # first in line for the next lease
                break
        kept.extend(self._orphans)
        self._orphans = kept
        return taken


class Budget:
    """The samples a lease may still take, `size(prompt)` each; the first prompt always."""

    def __init__(self, samples: int, size: Callable[[int], int]) -> None:
        self.size = size
        self.left = samples
        self.taken = 0

    def take(self, prompt_index: int) -> bool:
        cost = self.size(prompt_index)
        if self.taken and cost > self.left:
            return False
        self.left -= cost
        self.taken += 1
        return True
