"""Submissions: receive, queue in order of trust, validate, record verdicts.

A submission is recorded the moment it answers its lease (so nothing accepted is ever lost),
then validated by a worker thread, or by validator worker processes (trainer.validator_pool),
one lane per worker. The queue serves trusted nodes first; work of newcomers, and of nodes that
have cost more prefill than their accepted work justifies, waits for a shared per-minute budget
(trainer.admission), so junk cannot delay honest verdicts. A lane validates what is queued
already in batches (one padded prefill per version) of one trust tier, with at most one
submission per newcomer, so one cheat's ban never comes after a prefill of its other work. A
banned node's queued submissions are dropped unvalidated by the ledger.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import torch
import trio

from protocol import messages as msg
from protocol.envelope import Envelope, Verified
from protocol.errors import ProtocolError
from protocol.host import public_key_of_peer
from protocol.poolspec import PoolSpec
from protocol.wire import decode
from toploc.sampling import SamplingParams
from trainer.admission import LOST_WORKERS, PROVEN_CHEAT, TRANSPORT_REFUSAL, Admission
from trainer.algorithm import GroupAlgorithm
from trainer.ledger import Decision, LeaseAnswered, LeaseClosed, Ledger, LedgerError, NewGroup
from trainer.metrics import RunLog
from trainer.tasks import Task
from trainer.validator import Checked, Job, Validator, Verdict
from trainer.validator_pool import ValidatorPool, WorkerLost
from trainer.view import Progress

log = logging.getLogger("swarmrl.submissions")

# Transport refusals that prove something about the sender; rate limits and timeouts do not.
PROVING_REFUSALS = ("bad_request", "too_large")

BATCH_SUBMISSIONS = 8
"""Submissions one lane validates together, of those queued already (batching never waits)."""
MAX_LOSSES = 2
"""A submission validated alone whose worker died this many times is not tried again: soft,
with `LOST_WORKERS` strikes, so a node cannot stall validation with such submissions freely."""
LOST_WORKER_CHECK = "worker"
"""The deciding check named in that verdict."""

Validate = Callable[[list[Job], int], Awaitable[list[Checked]]]


@dataclass(order=True, frozen=True)
class _Queued:
    tier: int
    submission_id: int


def verdict_strikes(verdict: Verdict) -> float:
    """Strikes a verdict costs its node: a proven cheat, or a submission that kept killing
    validator workers (the check `_requeue_lost` names); nothing for other soft verdicts."""
    if verdict.outcome == "hard":
        return PROVEN_CHEAT
    return LOST_WORKERS if verdict.check == LOST_WORKER_CHECK else 0.0


class ValidationQueue:
    """Submission ids by (tier, arrival): trusted work first, newcomers' in arrival order."""

    def __init__(self) -> None:
        self._heap: list[_Queued] = []
        self._arrived = trio.Event()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, submission_id: int, tier: int) -> None:
        heapq.heappush(self._heap, _Queued(tier, submission_id))
        self._arrived.set()

    async def pop(self) -> _Queued:
        while not self._heap:
            await self._next_arrival().wait()
        return heapq.heappop(self._heap)

    def pop_nowait(self) -> _Queued | None:
        return heapq.heappop(self._heap) if self._heap else None

    async def wait_for_arrival(self, timeout_s: float) -> None:
        """Sleep up to `timeout_s`, waking early when something new is queued."""
        with trio.move_on_after(timeout_s):
            await self._next_arrival().wait()

    def _next_arrival(self) -> trio.Event:
        # One event for every waiter (one lane per validator worker): replacing an unset one
        # would leave the lanes waiting on it asleep for good.
        if self._arrived.is_set():
            self._arrived = trio.Event()
        return self._arrived


class SubmissionService:
    def __init__(
        self,
        spec: PoolSpec,
        ledger: Ledger,
        admission: Admission,
        validator: Validator,
        algorithm: GroupAlgorithm,
        task: Task,
        sampling: SamplingParams,
        run_log: RunLog,
        progress: Callable[[], Progress],
        on_verdict: Callable[[], None],
        on_ban: Callable[[bytes], None],
        pool: ValidatorPool | None = None,
        batch: int = BATCH_SUBMISSIONS,
    ) -> None:
        """`pool`: validate in its worker processes; None validates in a thread here.
        `on_verdict` is called after each verdict is recorded (new trainable groups, or fewer
        coming)."""
        self.spec = spec
        self.ledger = ledger
        self.admission = admission
        self.validator = validator
        self.algorithm = algorithm
        self.task = task
        self.sampling = sampling
        self.run_log = run_log
        self._progress = progress
        self._on_verdict = on_verdict
        self._on_ban = on_ban
        self.pool = pool
        self.batch = batch
        self.queue = ValidationQueue()
        self._losses: dict[int, int] = {}
        """Submission id -> how many workers died while holding it."""
        self._lost_s: dict[int, float] = {}
        """Submission id -> seconds its failed validations alone took: on its verdict."""

    def requeue_pending(self) -> None:
        """After a restart: submissions received but not decided go back in the queue."""
        for sid in self.ledger.pending_submissions():
            row = self.ledger.submission(sid)
            if row is not None:
                self.queue.push(sid, self.admission.tier(row["node"]))

    # ------------------------------------------------------------------ receiving

    async def on_submit(self, v: Verified[msg.Submission]) -> msg.Receipt:
        lease_id = v.message.lease_id
        if len(v.raw) > self.spec.limits.max_submission_bytes:
            return msg.Receipt(
                lease_id=lease_id,
                queued=False,
                code="too_large",
                reason=f"submission of {len(v.raw)} bytes is over the pool's limit",
            )
        now = time.time()
        try:
            sid = self.ledger.record_submission(lease_id, v.signer, v.raw, now)
        except LeaseAnswered as e:
            repeat = self._same_answer(lease_id, v.raw)
            if repeat is not None:
                # The node's retry after a lost receipt (a timeout, our restart): the same
                # content, counted once, so an honest node is never punished for the network.
                return msg.Receipt(
                    lease_id=lease_id, queued=True, code="repeat", submission_id=repeat
                )
            return self._refuse(v, e, now)
        except LedgerError as e:
            return self._refuse(v, e, now)
        self.queue.push(sid, self.admission.tier(v.signer))
        return msg.Receipt(lease_id=lease_id, queued=True, code="queued", submission_id=sid)

    def _same_answer(self, lease_id: int, raw: bytes) -> int | None:
        """The id of the lease's recorded answer when it signed exactly the body `raw` signs."""
        prior = self.ledger.answer_of(lease_id)
        if prior is None:
            return None

        def body(envelope: bytes) -> bytes:
            return decode(envelope, Envelope, max_bytes=len(envelope)).body

        return prior[0] if body(prior[1]) == body(raw) else None

    def _refuse(self, v: Verified[msg.Submission], e: LedgerError, now: float) -> msg.Receipt:
        lease_id = v.message.lease_id
        # Late or revoked: the work is simply not used. Anything else (a lease that does not
        # exist, is someone else's, was released, or was answered already) is a lie or a replay.
        late = isinstance(e, LeaseClosed)
        outcome = "soft" if late else "hard"
        strikes = 0.0 if late else PROVEN_CHEAT
        decision = Decision(outcome, str(e), {"lease_id": lease_id}, strikes)
        if late:  # once per lease: more copies of late work cost the ledger nothing
            recorded = self.ledger.record_late(v.signer, lease_id, decision, self.admission, now)
        else:
            recorded = self.ledger.record_rejected(v.signer, v.raw, decision, self.admission, now)
        if recorded is not None:
            self.run_log.verdict(outcome, "lease", 0.0)
            self._note_ban(v.signer, recorded[1])
        return msg.Receipt(
            lease_id=lease_id,
            queued=False,
            code="late" if late else "refused",
            reason=str(e)[:256],
        )

    def on_refusal(self, peer_id: str, code: str, detail: str) -> None:
        """The transport refused a request of `peer_id`: a member pays for what proves a fault."""
        if code not in PROVING_REFUSALS:
            return  # rate limiting is the remedy for floods; timeouts are not proof of anything
        try:
            key = public_key_of_peer(peer_id)
        except ProtocolError:
            return  # not an ed25519 identity, so never a member: nothing to take away
        if not self.ledger.is_active(key):
            return  # not a member (or banned already): nothing to take away
        reason = f"refused by the transport ({code}): {detail}"
        decision = Decision("hard", reason[:512], {"code": code}, TRANSPORT_REFUSAL)
        _, banned = self.ledger.record_rejected(
            key, detail.encode()[:4096], decision, self.admission, time.time()
        )
        self.run_log.verdict("hard", "transport", 0.0)
        self._note_ban(key, banned)

    # ------------------------------------------------------------------ validating

    async def validate_forever(self) -> None:
        if self.pool is None:
            await self._lane(None, self._in_process)
            return
        try:
            async with trio.open_nursery() as nursery:
                for worker in self.pool.workers:
                    nursery.start_soon(self._lane, worker.start, worker.validate)
        finally:
            self.pool.close()

    async def _lane(self, ready: Callable[[], Awaitable[None]] | None, run: Validate) -> None:
        while True:
            if ready is not None:
                await ready()  # (re)start the worker before taking work from the queue
            batch = await self.take_batch()
            if not batch:
                continue
            jobs = self.jobs(batch)
            began = time.perf_counter()
            try:
                checked = await run(jobs, self.current_version())
            except WorkerLost as e:
                log.warning("%s: %d submissions back in the queue", e, len(batch))
                self._requeue_lost(batch, str(e), time.perf_counter() - began)
                continue
            except Exception as e:  # a validator bug some input meets
                # The input that meets it pays (validated alone, then soft with strikes),
                # not the pool: this error once ended the coordinator (docs/security.md).
                log.exception("validating %d submissions failed; each goes back alone", len(batch))
                why = f"the validator failed on it: {type(e).__name__}"
                self._requeue_lost(batch, why, time.perf_counter() - began)
                continue
            self.finish_batch(batch, checked)

    # The lanes above, and validators on other machines (trainer.validator_remote), go
    # through `take_batch`, `jobs`, `finish_batch` and `return_batch`.

    def current_version(self) -> int:
        """The trainer's newest version: what a batch's staleness is judged against."""
        return self._progress().version

    def jobs(self, batch: list[dict[str, Any]]) -> list[Job]:
        return [self._job(row) for row in batch]

    def finish_batch(
        self, batch: list[dict[str, Any]], checked: list[Checked], by: str = ""
    ) -> None:
        """Record the verdicts on `batch` (one each, in order); `by` names a remote validator
        in each verdict's details."""
        now = time.time()
        for row, c in zip(batch, checked, strict=True):
            if by:
                c.verdict.details["validator"] = by
            self._record(row, c)
            if row["shared"]:
                self.admission.charge_probation(c.seconds, now)

    def return_batch(self, batch: list[dict[str, Any]]) -> None:
        """`batch` back in the queue, untouched: its validator went away, which says nothing
        about the submissions (unlike a worker that died holding them, `_requeue_lost`)."""
        for row in batch:
            self._push_back(row)

    def _push_back(self, row: dict[str, Any]) -> None:
        """A taken submission back in the queue, in its trust tier."""
        self.queue.push(row["id"], 1 if row["shared"] else 0)

    async def take_batch(self) -> list[dict[str, Any]]:
        """Queued submissions to validate together, in trust order: the first, then more
        trusted ones while they are queued already. A newcomer's goes alone, as does one a
        worker died holding: the shared budget is charged after a validation, so a batch of
        eight junk submissions begun on its last second held the validator, and every
        trusted submission behind it, for eight of them. Empty when the first was decided
        meanwhile or must wait for the budget."""
        item = await self.queue.pop()
        row = self._undecided(item.submission_id)
        if row is None:
            return []  # decided already (e.g. dropped when its node was banned)
        shared = row["shared"] = self.admission.tier(row["node"]) > 0
        if shared:
            wait = self.admission.probation_check_wait(time.time())
            if wait > 0:
                # Out of newcomers' budget: back in line, and trusted work that arrives
                # meanwhile goes first.
                self.queue.push(item.submission_id, 1)
                await self.queue.wait_for_arrival(wait)
                return []
        batch = [row]
        while not shared and item.submission_id not in self._losses and len(batch) < self.batch:
            nxt = self.queue.pop_nowait()
            if nxt is None:
                break
            row = self._undecided(nxt.submission_id)
            if row is None:
                continue
            row["shared"] = self.admission.tier(row["node"]) > 0
            if row["shared"] or nxt.submission_id in self._losses:
                self.queue.push(nxt.submission_id, nxt.tier)
                break
            batch.append(row)
        return batch

    def _undecided(self, submission_id: int) -> dict[str, Any] | None:
        row = self.ledger.submission(submission_id)
        return row if row is not None and row["outcome"] is None else None

    def _job(self, row: dict[str, Any]) -> Job:
        lease = self.ledger.lease(row["lease_id"])
        if lease is None:  # the ledger records a submission only against its lease
            raise LedgerError(f"submission {row['id']} answers lease {row['lease_id']}, not held")
        return Job(row["id"], row["raw"], lease["tasks"], lease["body"])

    async def _in_process(self, jobs: list[Job], current: int) -> list[Checked]:
        return await trio.to_thread.run_sync(self._validate, jobs, current)

    def _validate(self, jobs: list[Job], current: int) -> list[Checked]:
        with torch.no_grad():
            return self.validator.validate_jobs(jobs, self.sampling, current)

    def _requeue_lost(self, batch: list[dict[str, Any]], reason: str, seconds: float) -> None:
        """A worker died holding `batch` (or the validator failed on it): each goes back in
        line, to be validated alone; one that was alone and lost a worker `MAX_LOSSES` times
        is decided soft instead. The `seconds` the attempt took are charged as a verdict's
        are: to the newcomers' shared budget when the batch is theirs (a batch is of one
        tier), and to the node of a submission validated alone, with its verdict. Uncharged,
        a newcomer whose junk made validation fail cost the pool seconds it never paid for."""
        if batch[0]["shared"]:
            self.admission.charge_probation(seconds, time.time())
        if len(batch) == 1:
            sid = batch[0]["id"]
            self._lost_s[sid] = self._lost_s.get(sid, 0.0) + seconds
        for row in batch:
            sid = row["id"]
            losses = self._losses.get(sid, 0) + 1
            if len(batch) == 1 and losses >= MAX_LOSSES:
                why = f"not validated: its validation failed {losses} times ({reason})"
                verdict = Verdict("soft", why[:512], LOST_WORKER_CHECK)
                self._record(row, Checked(verdict, -1, 0.0))
                continue
            self._losses[sid] = losses
            self._push_back(row)

    def _record(self, row: dict[str, Any], checked: Checked) -> None:
        """The verdict into the ledger (with its groups, strikes and cost), logs and bans."""
        self._losses.pop(row["id"], None)
        lost_s = self._lost_s.pop(row["id"], 0.0)
        if self._undecided(row["id"]) is None:
            return  # decided while it was validated: its node was banned meanwhile
        verdict, seconds = checked.verdict, checked.seconds + lost_s
        groups = [self._accepted_group(g) for g in verdict.groups]
        strikes = verdict_strikes(verdict)
        details = {**verdict.details, "check": verdict.check, "seconds": round(seconds, 3)}
        decision = Decision(
            verdict.outcome, verdict.reason, details, strikes, groups, seconds=seconds
        )
        banned = self.ledger.decide(row["id"], decision, self.admission, time.time())
        self.run_log.verdict(verdict.outcome, verdict.check, seconds)
        self._log_samples(row, verdict, checked.version, groups)
        self._note_ban(row["node"], banned)
        self._on_verdict()

    def _accepted_group(self, g: Any) -> NewGroup:
        scored = self.algorithm.score(g.rewards)
        return NewGroup(
            g.task_index,
            g.prompt_index,
            g.weight_version,
            g.rewards,
            scored.advantages,
            msgspec.msgpack.encode(g.payload),
            sum(len(t) for t in g.payload.tokens),
            scored.dropped,
        )

    def _note_ban(self, node: bytes, banned: bool) -> None:
        if banned:
            self._on_ban(node)
            log.warning(
                "node %s banned: %s",
                node.hex()[:12],
                (self.ledger.node(node) or {}).get("ban_reason"),
            )

    def _log_samples(
        self,
        row: dict[str, Any],
        verdict: Verdict,
        version: int,
        groups: list[NewGroup],
    ) -> None:
        at = self._progress()
        base = {
            "submission": row["id"],
            "node": row["node"].hex()[:12],
            "verdict": verdict.outcome,
            "reason": verdict.reason,
            "check": verdict.check,
            "trainer_step": at.step,
        }
        if verdict.outcome != "accept":
            self.run_log.sample({**base, "version": version if version >= 0 else None})
            return
        for g, stored in zip(verdict.groups, groups, strict=True):
            example = self.task.train[g.prompt_index]
            for j, text in enumerate(g.completions):
                self.run_log.sample(
                    {
                        **base,
                        "version": g.weight_version,
                        "staleness": at.version - g.weight_version,
                        "prompt_index": g.prompt_index,
                        "prompt": example.prompt,
                        "completion": text,
                        "reward": g.rewards[j],
                        "rewards": {k: v[j] for k, v in g.per_func.items()},
                        "advantage": stored.advantages[j],
                        "dropped": stored.dropped,
                    }
                )
