"""Difficulty-aware leasing: prompts that teach nothing are handed out less often.

A group whose samples all earn the same reward (every sample solved, or none) has zero
advantage everywhere and trains nothing. Each prompt's estimate is read from the ledger's
accepted groups only (validated work; a node cannot talk a prompt out of rotation without
doing the work): its `WINDOW` most recent groups. A prompt is *settled* when it has that many
and all their samples earned one reward (for 0/1 rewards: pass rate 0 or 1).

A prompt settled *solved* drawn for a lease is kept with probability `KEEP`, so its estimate can
still change as the policy does; otherwise the draw moves on to the next prompt. Prompts settled
unsolved stay in rotation: sampling them is the only way to find a first success. The coin is a
hash of (pool seed, prompt index, the prompt's draw counter, the lease slot's draw), never
`random`: anyone holding the ledger can replay every decision. The slot's draw is in the hash
because the draw counter advances only when a prompt is handed out; on its own it would give a
skipped prompt the same coin at every later draw, and skip it for good.

A prompt still leased gets more samples when its estimate says a group of the pool's size
would most likely be flat (`group_size`): at pass rate p, a group of G 0/1 rewards is flat with
probability p^G + (1-p)^G (for graded rewards, the sum over reward values of their shares to
the G), so G grows until that is about `FLAT_TARGET`, up to the pool's `max_group_size`. A
prompt solved 1 time in 20 gives a flat group of 16 44% of the time, and one of 45 10% of the
time: more samples, but each one far likelier to train. A prompt with no
accepted group yet is sized from the pool's `POOL_WINDOW` newest accepted groups, whatever
their prompts: what the current policy does on the task is the best guess for a prompt it has
not been seen on (in the demo, the leases sent out in the second after the first groups came
back went out at the pool's size, and about one in three of them came back flat).
"""

from __future__ import annotations

import math
import struct
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import blake3

WINDOW = 2
"""Recent accepted groups per prompt an estimate reads."""
KEEP = 0.2
"""Chance that a settled prompt is leased when drawn: about one draw in five."""
PAGE = 5000
"""Groups read from the ledger per query."""
FLAT_TARGET = 0.1
"""The chance of a flat group that `Curriculum.group_size` sizes a prompt's group for."""
POOL_WINDOW = 16
"""Newest accepted groups (of any prompts) that size a prompt with no estimate of its own."""

AcceptedReader = Callable[[int, int], list[tuple[int, int, list[float]]]]
"""`Ledger.accepted_rewards_since(after, limit)`: (group id, prompt index, rewards) of the
accepted groups with ids above `after`, oldest first."""


@dataclass(frozen=True)
class Estimate:
    """A prompt's recent record: samples, how many earned the full reward, how many earned
    its most common reward, and whether every sample earned the same reward."""

    samples: int
    solved: int
    groups: int
    flat: bool
    modal: int
    """Samples that earned the most common reward (for 0/1 rewards, the larger of solved and
    unsolved): what says how likely a group is to come back flat."""

    @property
    def pass_rate(self) -> float:
        return self.solved / self.samples if self.samples else 0.0


class Curriculum:
    """Per-prompt estimates from accepted groups, and the rule that thins out settled prompts."""

    def __init__(
        self, pool_seed: int, full_reward: float = 1.0, window: int = WINDOW, keep: float = KEEP
    ) -> None:
        if window < 1:
            raise ValueError(f"the window must hold at least one group, not {window}")
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"the keep probability must be in (0, 1], not {keep}")
        self.pool_seed = pool_seed
        self.full_reward = full_reward
        self.window = window
        self.keep_probability = keep
        self._recent: dict[int, deque[list[float]]] = {}
        self._pool: deque[list[float]] = deque(maxlen=POOL_WINDOW)
        self.last_group = 0
        """The newest group id read from the ledger."""

    def add(self, group_id: int, prompt_index: int, rewards: list[float]) -> None:
        """One accepted group, in id order."""
        self._recent.setdefault(prompt_index, deque(maxlen=self.window)).append(rewards)
        self._pool.append(rewards)
        self.last_group = max(self.last_group, group_id)

    def refresh(self, read: AcceptedReader) -> int:
        """Read the groups accepted since the last call; returns how many."""
        n = 0
        while True:
            rows = read(self.last_group, PAGE)
            for group_id, prompt_index, rewards in rows:
                self.add(group_id, prompt_index, rewards)
            n += len(rows)
            if len(rows) < PAGE:
                return n

    def estimate(self, prompt_index: int) -> Estimate | None:
        groups = self._recent.get(prompt_index)
        return self._summary(groups) if groups else None

    def _summary(self, groups: Iterable[list[float]]) -> Estimate:
        groups = list(groups)
        rewards = [r for g in groups for r in g]
        solved = sum(r >= self.full_reward - 1e-9 for r in rewards)
        flat = max(rewards) - min(rewards) <= 1e-9
        modal = max(Counter(round(r, 9) for r in rewards).values())
        return Estimate(len(rewards), solved, len(groups), flat, modal)

    def settled(self, prompt_index: int) -> bool:
        e = self.estimate(prompt_index)
        return e is not None and e.groups >= self.window and e.flat

    def keep(self, prompt_index: int, draws: int, slot_draw: int) -> bool:
        """Whether a draw that landed on `prompt_index` leases it: always for an unsettled
        prompt, and for one settled unsolved (only sampling it can find the first success,
        and a policy that masters its neighbours often starts solving it: thinning those out
        cost the default demo a third of its final accuracy); for one settled solved when its
        coin falls under the keep probability."""
        estimate = self.estimate(prompt_index)
        if not self.settled(prompt_index) or estimate is None or estimate.solved == 0:
            return True
        return coin(self.pool_seed, prompt_index, draws, slot_draw) < self.keep_probability

    def group_size(self, prompt_index: int, base: int, largest: int) -> int:
        """Samples to lease for `prompt_index`: `base`, or for a prompt whose record makes a
        group of `base` likely flat, the smallest G in (base, largest] whose chance of a flat
        group is about `FLAT_TARGET` (capped at `largest`). A group of G is flat with
        probability sum over reward values v of q_v^G (p^G + (1-p)^G for 0/1 rewards at pass
        rate p), which the most common value q dominates once G is past a handful of
        samples. q is smoothed by half a sample either way, so 0 of 32 reads as 1 in 66, not
        as never: a prompt never solved yet is sampled widely, not endlessly. Graded rewards
        count too: the demo's copy task gives 0, 0.5 or 1, and its flat groups, all 0 at the
        start and all 1 at the end, were sized as if nothing were known."""
        estimate = self.estimate(prompt_index)
        if estimate is None and self._pool:
            estimate = self._summary(self._pool)  # a prompt not seen yet: the pool's record
        if estimate is None or largest <= base:
            return base
        likely = (estimate.modal + 0.5) / (estimate.samples + 1)
        need = math.ceil(math.log(FLAT_TARGET) / math.log(likely))
        return min(largest, max(base, need))

    def counts(self) -> dict[str, int]:
        """Prompts with an estimate, and how many of them are settled solved or unsolved."""
        out = {"estimated": 0, "settled_solved": 0, "settled_unsolved": 0}
        for p in self._recent:
            out["estimated"] += 1
            e = self.estimate(p)
            if e is not None and self.settled(p):
                out["settled_solved" if e.solved else "settled_unsolved"] += 1
        return out


def coin(pool_seed: int, prompt_index: int, draws: int, slot_draw: int) -> float:
    """A uniform number in [0, 1) from blake3(b"curriculum", pool seed, prompt, draws, slot
    draw), each packed big-endian as 8 bytes (the seed signed)."""
    digest = blake3.blake3(
        b"curriculum" + struct.pack(">qQQQ", pool_seed, prompt_index, draws, slot_draw)
    ).digest(8)
    return int.from_bytes(digest, "big") / 2.0**64
