"""Leases: issue, release, expiry.

A lease is issued only on the admission policy's terms (probation, quota) and only while more
work would not go stale before the trainer can use it. Expired, released and revoked leases
give their prompts back to `LeaseBook`, barred from the node that gave them up. Fresh draws
pass over most prompts the accepted groups show to be always or never solved (`Curriculum`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import msgspec
import trio

from protocol import messages as msg
from protocol.poolspec import PoolSpec
from trainer.admission import BUSY_REASON, QUOTA_RETRY_S, Admission
from trainer.algorithm import FLAT
from trainer.curriculum import Curriculum
from trainer.leases import LeaseBook, NothingToLease, task_seed
from trainer.ledger import Ledger
from trainer.pulse import Pulse
from trainer.view import Progress

log = logging.getLogger("swarmrl.leases")


class LeaseService:
    def __init__(
        self,
        spec: PoolSpec,
        batch_prompts: int,
        ledger: Ledger,
        admission: Admission,
        n_prompts: int,
        prompt_ids: Callable[[int], list[int]],
        sampling: msg.SamplingWire,
        progress: Callable[[], Progress],
        max_steps: int | None = None,
        full_reward: float = 1.0,
        demand: Pulse | None = None,
    ) -> None:
        """`full_reward`: the reward of a solved sample (the task's weights summed)."""
        demand = demand or Pulse()
        self.spec = spec
        self.batch_prompts = batch_prompts
        self.ledger = ledger
        self.admission = admission
        self.book = LeaseBook(spec.seed, n_prompts)
        self.curriculum = Curriculum(spec.seed, full_reward)
        self._prompt_ids = prompt_ids
        self.sampling = sampling
        self._progress = progress
        self.max_steps = max_steps
        self.demand = demand
        """Fired whenever more work may be wanted: a step took a batch, a verdict came, a lease
        closed unanswered. Held lease requests look again then."""
        self._holding: set[bytes] = set()
        self._outage: set[int] = set()
        """Leases open when this process started (see `grant_outage_grace`)."""
        self._issued = 0
        self._cached: tuple[tuple[int, int, int, int], tuple[int, int, int, float]] | None = None

    async def on_lease(self, v: Any) -> msg.LeaseReply:
        """A lease, or why not. A trusted node refused only because the pool has enough work
        in flight is held up to its `wait_s` (at most `LEASE_HOLD_S`) and leased the moment
        the trainer needs more: a node told to come back later sat idle through the trainer's
        next batch (0.4-0.9 s of every 1.1 s step on the tiny demo)."""
        reply = self._decide(v, fresh=True)
        if reply is not None:
            return reply
        wait_s = min(v.message.wait_s, LEASE_HOLD_S)
        if wait_s <= 0 or v.signer in self._holding or len(self._holding) >= MAX_HELD:
            return msg.LeaseReply(code="busy", retry_after_s=0.5, reason=BUSY_REASON)
        self._holding.add(v.signer)
        try:
            with trio.move_on_after(wait_s):
                while reply is None:
                    await self.demand.wait()
                    if not self._still_busy(v.message.weight_version):
                        reply = self._decide(v, fresh=False)
        finally:
            self._holding.discard(v.signer)
        return reply or msg.LeaseReply(code="busy", retry_after_s=0.0, reason=BUSY_REASON)

    def _still_busy(self, node_version: int) -> bool:
        """Whether a held request would still be held: a cheap look, from the count shared
        by every held request, before the full decision (which asks admission about the
        node)."""
        at = self._progress()
        first = self._first_answer(at, node_version)
        if first is not None:
            return first is HOLD
        held, _ = self._versions(at, node_version)
        return self._wanted(at, held, fresh=False) == 0

    def _first_answer(self, at: Progress, node_version: int) -> msg.LeaseReply | object | None:
        """What the pool's progress alone answers a node holding `node_version`: finished, or
        fetch newer weights; `HOLD` while the weights any lease needs are still being made;
        None when it is up to the work in flight and the node's terms."""
        if self.max_steps is not None and at.step >= self.max_steps:
            return msg.LeaseReply(code="finished", retry_after_s=5.0, reason="training finished")
        held, min_version = self._versions(at, node_version)
        if min_version > at.version:
            return HOLD
        if held < min_version:
            return msg.LeaseReply(
                code="fetch_weights",
                retry_after_s=1.0,
                reason=f"weights v{held} are too old; fetch v{at.version} first",
            )
        return None

    def _versions(self, at: Progress, node_version: int) -> tuple[int, int]:
        """(the version a lease would be on, the oldest the next batch still to be taken can
        train). Measured from the version being made: a lease issued while a step trains
        serves the batch after it (measured from the last published one, leases issued as a
        step took its batch went stale before their groups arrived)."""
        held = min(node_version, at.version)
        return held, max(0, self.spec.limits.oldest_trainable(at.frontier))

    def _decide(self, v: Any, fresh: bool) -> msg.LeaseReply | None:
        """The answer to lease request `v` now; None when it is refused only because enough
        work is in flight, or because the weights any lease needs are still being made.
        `fresh`: count the work in flight anew (a held request reuses the count made since
        the last change, so waking many held requests costs one count)."""
        now = time.time()
        at = self._progress()
        first = self._first_answer(at, v.message.weight_version)
        if first is not None:
            return None if first is HOLD else first
        held, min_version = self._versions(at, v.message.weight_version)
        wanted = self._wanted(at, held, fresh)
        terms = self.admission.lease_terms(v.signer, now, wanted == 0)
        if terms.for_demand:
            return None
        if terms.code != "ok":
            return msg.LeaseReply(
                code=terms.code, retry_after_s=terms.retry_after_s, reason=terms.reason
            )
        try:
            # a trusted lease carries no more than is wanted (a newcomer's is 1 prompt anyway)
            prompts = max(1, min(terms.prompts, wanted))
            lease = self._issue(v.signer, now, held, min_version, prompts)
        except NothingToLease as e:
            return msg.LeaseReply(code="quota", retry_after_s=QUOTA_RETRY_S, reason=str(e))
        return msg.LeaseReply(lease=lease)

    def _issue(
        self, node: bytes, now: float, held: int, min_version: int, n_tasks: int
    ) -> msg.Lease:
        deadline = now + self.spec.limits.lease_timeout_s
        # Every group accepted so far, read on the event loop right before the lease: the
        # curriculum's state at issue time is the ledger's accepted groups up to then.
        self.curriculum.refresh(self.ledger.accepted_rewards_since)

        def keep(prompt: int, slot_draw: int) -> bool:
            return self.curriculum.keep(prompt, self.ledger.prompt_draws(prompt), slot_draw)

        window_start = now - self.admission.config.window_s
        gave_up, holding = self.ledger.withheld_prompts(node, window_start)

        base = self.spec.sampling.group_size
        # no prompt larger than this lease's whole budget (a newcomer's lease is smaller)
        largest = min(self.spec.sampling.max_group_size, n_tasks * base)
        sizes: dict[int, int] = {}

        def size(prompt: int) -> int:
            if prompt not in sizes:
                sizes[prompt] = self.curriculum.group_size(prompt, base, largest)
            return sizes[prompt]

        def plan(counter: int) -> list[int]:
            return self.book.plan(
                node, counter, n_tasks, keep, gave_up, holding, size, n_tasks * base
            )

        def build(
            lease_id: int, counter: int, draws: list[tuple[int, int]]
        ) -> tuple[list[dict[str, Any]], bytes]:
            tasks = [
                {
                    "prompt_index": p,
                    "draw": d,
                    "prompt_ids": self._prompt_ids(p),
                    "seed": task_seed(self.spec.seed, p, d),
                    "group_size": size(p),
                }
                for p, d in draws
            ]
            lease = msg.Lease(
                lease_id=lease_id,
                node=node,
                counter=counter,
                weight_version=held,
                min_version=min_version,
                tasks=[msg.LeaseTask(**{k: v for k, v in t.items() if k != "draw"}) for t in tasks],
                sampling=self.sampling,
                deadline_ms=int(deadline * 1000),
            )
            return tasks, msgspec.msgpack.encode(lease)

        _, _, _, body = self.ledger.issue_lease(node, now, deadline, held, plan, build)
        self._issued += 1
        return msgspec.msgpack.decode(body, type=msg.Lease)

    async def on_release(self, v: Any) -> msg.Receipt:
        lease_id = v.message.lease_id
        released = self._release(v.signer, lease_id, time.time())
        if released is None:
            return msg.Receipt(
                lease_id=lease_id,
                queued=False,
                code="refused",
                reason="no such open lease of yours",
            )
        self.demand.fire()
        why = "released (beyond the allowance: a soft fault)" if released else "released"
        return msg.Receipt(lease_id=lease_id, queued=False, code="released", reason=why)

    def release_abandoned(self, node: bytes, now: float) -> list[int]:
        """Release the leases still open under `node`'s key when a new process of it joins
        saying it holds none (`JoinRequest.fresh_start`): an earlier process died with them.
        Their prompts go to others now instead of at the deadline, and the node is not left
        waiting out leases it cannot answer, then charged an expiry for each. Each counts
        as a release, against the same allowance: the node could have sent each release
        itself, had it known the ids."""
        released = [
            i for i in self.ledger.open_lease_ids(node) if self._release(node, i, now) is not None
        ]
        if released:
            log.info("leases %s released: their node restarted without them", released)
            self.demand.fire()
        return released

    def _release(self, node: bytes, lease_id: int, now: float) -> bool | None:
        """Release one of `node`'s open leases and give its prompts back. None when it had no
        such open lease, else whether the release was a soft fault (beyond the allowance)."""
        fault = self.admission.release_is_fault(node, now)
        if not self.ledger.release_lease(lease_id, node, now, fault=fault):
            return None
        self.give_back([lease_id])
        return fault

    def give_back(self, lease_ids: list[int]) -> None:
        """The prompts of closed, unanswered leases go to others (never straight back: the
        ledger bars them from their node for the window)."""
        for lease_id in lease_ids:
            lease = self.ledger.lease(lease_id)
            if lease is not None:
                self.book.return_prompts([t["prompt_index"] for t in lease["tasks"]])

    def grant_outage_grace(self, now: float) -> None:
        """On start, give every lease still open a full term from now: its node could not
        submit while the coordinator was down, and an expiry then would be held against it
        as a soft fault (and bar it from those prompts) for our outage, not its own. If such a
        lease expires all the same it is revoked, not expired: the crash may have come
        between recording it and sending it, so its node may never have had it (a node in
        the crash test lost its one lease slot that way, then its quota for the window)."""
        self._outage = set(self.ledger.extend_open_leases(now + self.spec.limits.lease_timeout_s))
        if self._outage:
            log.info("%d open leases get a full term after the restart", len(self._outage))

    def expire(self, now: float) -> list[int]:
        """Close the open leases past their deadline (a soft fault each, except those open at
        a restart); their prompts go to other nodes. Returns their ids."""
        expired = self.ledger.expire_leases(now, forgiven=frozenset(self._outage))
        if expired:
            log.info("leases %s expired; their prompts go to other nodes", expired)
            self._outage.difference_update(expired)
            self.give_back(expired)
            self.demand.fire()
        return expired

    async def expire_forever(self, every_s: float = 1.0) -> None:
        while True:
            self.expire(time.time())
            await trio.sleep(every_s)

    def _wanted(self, at: Progress, lease_version: int, fresh: bool) -> int:
        """Prompts (groups) another trusted lease on weights `lease_version` may carry before
        its groups would only go stale; 0 when the trainer has enough work in flight.

        Two bounds, in groups. Done work (accepted and trainable, or submitted and not yet
        validated) waits for the trainer: past one batch of it, the trainer is the bottleneck
        and more would wait its staleness away. Done plus leased work (what trusted nodes are
        still generating) stays within the batches the steps this lease can still reach will
        train (`reachable_groups`). Measured on the default swarm (docs/swarm.md): a single
        bound of 6 batches on both dropped 61% of the accepted groups as stale; these two drop
        7-12%. Newcomers' leases are left out: they have their own shared slots, so they
        cannot crowd trusted work out. Groups a step has taken count as trained already,
        though the ledger marks them so only once a checkpoint covers them.
        """
        key = (self.demand.generation, self._issued, at.frontier, len(at.in_training))
        if fresh or self._cached is None or self._cached[0] != key:
            self._cached = (key, self._counts(at))
        trainable, pending, leased, informative = self._cached[1]
        return wanted_tasks(
            trainable=trainable,
            pending=pending,
            leased=leased,
            batch=self.batch_prompts,
            window=reachable_groups(
                self.spec.limits.max_staleness, self.batch_prompts, lease_version, at.frontier
            ),
            informative=informative,
        )

    def _counts(self, at: Progress) -> tuple[int, int, int, float]:
        """(trainable, pending, leased groups, informative share) as the ledger has them."""
        oldest = self.spec.limits.oldest_trainable(at.frontier)
        taken = sum(1 for v in at.in_training if v >= oldest)
        informative = self.ledger.share_not_dropped_for(FLAT, INFORMATIVE_WINDOW)
        return (
            self.ledger.count_trainable(oldest) - taken,
            self.ledger.pending_groups(),
            self.ledger.open_lease_groups(),
            1.0 if informative is None else informative,
        )


def wanted_tasks(
    *,
    trainable: int,
    pending: int,
    leased: int,
    batch: int,
    window: int,
    informative: float,
) -> int:
    """`LeaseService._wanted`'s rule: prompts (groups) one more lease may carry, 0 for none.
    `trainable`: accepted groups the trainer can still use; `pending` groups (of submissions
    not yet validated) and `leased` ones (of open leases) are coming, of which only the
    `informative` share (not all rewards equal) can train. (Counted in groups, not leases:
    with `max_group_size` a lease holds fewer, larger groups.) Counting every coming group as
    trainable starved the trainer whenever most groups were flat: on the default demo 70%
    were at the start, so the pool leased a third of what the trainer could use and a step
    waited seconds for its batch. The share has a floor of one half: the share lags learning
    (once prompts start to be solved, more groups are informative than the newest 64 say),
    and with a floor of 1/8 the all-kinds chaos swarm leased so far ahead that it dropped 202
    groups as stale against 23 before; at most twice the window now.

    What is still wanted is rounded to the nearest whole group, not up to whole leases: once
    leases went out the moment a step took its batch, the last lease of each batch overshot
    the window by up to a lease less one group, and those groups went stale (56-66 a demo run
    against 21-32). Nor up to the next group: dividing by an informative share just under 1
    (one flat group among the newest 64) then leased 9 groups for every batch of 8, and the
    ninth went stale; rounding to the nearest, 6-17 groups went stale a demo run against
    19-34, and the waste fell from 15-19% to 10-15% (docs/swarm.md, "Wasted groups")."""
    trains = max(informative, MIN_INFORMATIVE)
    done = trainable + pending * trains
    if done >= batch:
        return 0
    return max(0, math.floor((window - done - leased * trains) / trains + 0.5))


LEASE_HOLD_S = 5.0
"""The longest a lease request is held for demand, whatever the node asked: well inside a
node's request timeout (30 s), and short enough that a node stopping waits little for it."""
HOLD = object()
"""`LeaseService._first_answer`: hold the request, the weights a lease needs are being made."""
MAX_HELD = 256
"""Lease requests held at once, one per node: a held request costs a stream and a sleeping
task; past this, nodes are told to come back as before holds existed."""

INFORMATIVE_WINDOW = 64
"""Accepted groups (the newest) whose share of informative ones paces leasing."""
MIN_INFORMATIVE = 0.5


def in_flight_groups(spec: PoolSpec, batch_prompts: int) -> int:
    """Groups done or leased that the staleness window can still train."""
    return reachable_groups(spec.limits.max_staleness, batch_prompts, 0, 0)


def reachable_groups(max_staleness: int, batch: int, lease_version: int, version: int) -> int:
    """Groups the steps that can still train work on weights `lease_version` will take, once
    the trainer has made `version`: one batch per step left in its staleness window.

    A node that has not fetched the newest weights yet is leased on the ones it holds, and its
    groups can reach one step fewer than fresh ones. On the default demo most leases were one
    version behind (steps come every ~3 s, weights reach nodes in 1.7-3.6 s); bounding them by
    the whole window dropped 107-122 of 548-573 accepted groups as stale, this bound 34-60 of
    441-498."""
    steps_left = lease_version + max_staleness - version
    return max(1, min(steps_left, max_staleness)) * batch
