"""Submissions: receive, queue in order of trust, validate, record verdicts.

A submission is recorded the moment it answers its lease (so nothing accepted is ever lost),
then validated by a worker thread. The queue serves trusted nodes first; work of newcomers, and
of nodes that have cost more prefill than their accepted work justifies, waits for a shared
per-minute budget (trainer.admission), so junk cannot delay honest verdicts. A banned node's
queued submissions are dropped unvalidated by the ledger.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import torch
import trio

from protocol import messages as msg
from protocol.envelope import Envelope, Verified
from protocol.host import public_key_of_peer
from protocol.poolspec import PoolSpec
from protocol.wire import decode
from toploc.sampling import SamplingParams
from trainer.admission import PROVEN_CHEAT, TRANSPORT_REFUSAL, Admission
from trainer.algorithm import GroupAlgorithm
from trainer.ledger import Decision, LeaseAnswered, LeaseClosed, Ledger, LedgerError, NewGroup
from trainer.metrics import RunLog
from trainer.tasks import Task
from trainer.validator import LeaseView, Validator, Verdict
from trainer.view import Progress

log = logging.getLogger("swarmrl.submissions")

# Transport refusals that prove something about the sender; rate limits and timeouts do not.
PROVING_REFUSALS = ("bad_request", "too_large")


@dataclass(order=True, frozen=True)
class _Queued:
    tier: int
    submission_id: int


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
            self._arrived = trio.Event()
            await self._arrived.wait()
        return heapq.heappop(self._heap)

    async def wait_for_arrival(self, timeout_s: float) -> None:
        """Sleep up to `timeout_s`, waking early when something new is queued."""
        self._arrived = trio.Event()
        with trio.move_on_after(timeout_s):
            await self._arrived.wait()


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
        on_accept: Callable[[], None],
        on_ban: Callable[[bytes], None],
    ) -> None:
        self.spec = spec
        self.ledger = ledger
        self.admission = admission
        self.validator = validator
        self.algorithm = algorithm
        self.task = task
        self.sampling = sampling
        self.run_log = run_log
        self._progress = progress
        self._on_accept = on_accept
        self._on_ban = on_ban
        self.queue = ValidationQueue()

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
        _, banned = self.ledger.record_rejected(v.signer, v.raw, decision, self.admission, now)
        self.run_log.verdict(outcome, "lease", 0.0)
        self._note_ban(v.signer, banned)
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
        key = public_key_of_peer(peer_id)
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
        while True:
            item = await self.queue.pop()
            row = self.ledger.submission(item.submission_id)
            if row is None or row["outcome"] is not None:
                continue  # decided already (e.g. dropped when its node was banned)
            shared = self.admission.tier(row["node"]) > 0
            if shared:
                wait = self.admission.probation_check_wait(time.time())
                if wait > 0:
                    # Out of newcomers' budget: back in line, and trusted work that arrives
                    # meanwhile goes first.
                    self.queue.push(item.submission_id, 1)
                    await self.queue.wait_for_arrival(wait)
                    continue
            seconds = await self._validate_one(row)
            if shared:
                self.admission.charge_probation(seconds, time.time())

    async def _validate_one(self, row: dict[str, Any]) -> float:
        """Validate and record; returns the prefill seconds it took."""
        t0 = time.perf_counter()
        version = self._progress().version
        verdict, submission = await trio.to_thread.run_sync(self._validate, row, version)
        seconds = time.perf_counter() - t0
        groups = [self._accepted_group(g) for g in verdict.groups]
        strikes = PROVEN_CHEAT if verdict.outcome == "hard" else 0.0
        details = {**verdict.details, "check": verdict.check, "seconds": round(seconds, 3)}
        decision = Decision(
            verdict.outcome, verdict.reason, details, strikes, groups, seconds=seconds
        )
        banned = self.ledger.decide(row["id"], decision, self.admission, time.time())
        self.run_log.verdict(verdict.outcome, verdict.check, seconds)
        self._log_samples(row, verdict, submission, groups)
        self._note_ban(row["node"], banned)
        if verdict.outcome == "accept":
            self._on_accept()
        return seconds

    def _validate(self, row: dict[str, Any], current: int) -> tuple[Verdict, msg.Submission | None]:
        env = decode(row["raw"], Envelope, max_bytes=len(row["raw"]))
        submission = decode(env.body, msg.Submission)
        lease = self.ledger.lease(row["lease_id"])
        signed = msgspec.msgpack.decode(lease["body"], type=msg.Lease)  # what the node was sent
        view = LeaseView(
            tasks=lease["tasks"], min_version=signed.min_version, sampling=self.sampling
        )
        with torch.no_grad():
            return self.validator.validate(submission, view, current), submission

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
        submission: msg.Submission | None,
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
            self.run_log.sample(
                {**base, "version": submission.weight_version if submission else None}
            )
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
