"""Validation in worker processes: the same verdicts as in-process, through the same ledger
path, and a worker killed while it holds a batch loses nothing (the batch is validated
again, alone, and the worker restarted)."""

import os
import signal

import msgspec
import pytest
import trio

from node.engine import HFEngine
from node.hardware import probe
from protocol import messages as msg
from protocol.envelope import EnvelopeVerifier, seal
from protocol.identity import Identity
from tests.trainer.pools import tiny_coordinator
from trainer.config import TrainerConfig, TrainerSection
from trainer.coordinator import Coordinator
from trainer.submissions import SubmissionService, ValidationQueue
from trainer.validator import Verdict
from trainer.validator_pool import ValidatorPool


def _coordinator(tmp_path, validators: int) -> Coordinator:
    config = TrainerConfig(trainer=TrainerSection(validators=validators))
    coord = tiny_coordinator(
        tmp_path, config, digits=2, max_new_tokens=8, limits={"lease_prompts": 1}
    )
    coord.policy.export(coord.training.learner.publishable(), coord.tokenizer, 0)
    return coord


async def _answer(coord: Coordinator, engine: HFEngine, tamper: bool):
    """A trusted member's signed answer to its lease: honest, or with a changed logprob."""
    me = Identity.generate()
    verifier = EnvelopeVerifier(coord.pool_id)

    def signed(message):
        return verifier.open(seal(me, coord.pool_id, message), type(message))

    join = msg.JoinRequest(probe("cpu", self_test_s=0.0), "hf", "test")
    assert (await coord.on_join(signed(join))).accepted
    coord.ledger.set_probation(me.public_key, False)
    lease = (await coord.leases.on_lease(signed(msg.LeaseRequest(weight_version=0)))).lease
    results = engine.generate(lease)
    if tamper:
        c = results[0].completions[0]
        fake = msgspec.structs.replace(c, logprobs=[x * 0.5 - 0.1 for x in c.logprobs])
        results[0] = msgspec.structs.replace(
            results[0], completions=[fake, *results[0].completions[1:]]
        )
    return signed(msg.Submission(lease_id=lease.lease_id, weight_version=0, results=results))


async def _submit_all(coord: Coordinator, engine: HFEngine) -> list[int]:
    """An honest, a tampered and an honest submission, queued back to back (on_submit does
    not yield, so a lane wakes to all three queued)."""
    answers = [await _answer(coord, engine, tamper) for tamper in (False, True, False)]
    receipts = [await coord.submissions.on_submit(a) for a in answers]
    assert all(r.queued for r in receipts)
    return [r.submission_id for r in receipts]


def _verdicts(coord: Coordinator, sids: list[int]) -> list[tuple[str, str]]:
    rows = [coord.ledger.submission(s) for s in sids]
    return [(r["outcome"], msgspec.json.decode(r["details"])["check"]) for r in rows]


async def _until(condition, timeout_s: float) -> None:
    with trio.fail_after(timeout_s):
        while not condition():
            await trio.sleep(0.05)


def test_workers_give_the_in_process_verdicts_and_a_killed_workers_batch_is_requeued(
    tmp_path,
):
    coord = _coordinator(tmp_path, validators=2)
    pool = coord.submissions.pool
    assert isinstance(pool, ValidatorPool) and len(pool.workers) == 2
    coord.submissions.batch = 2  # both lanes get work: 3 queued, at most 2 in a batch
    engine = HFEngine()
    engine.load(coord.policy.folder(0), 0)
    first, second = pool.workers

    async def scenario():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(coord.submissions.validate_forever)
            await _until(lambda: first.pid and second.pid, 60)
            # The first worker is frozen before work arrives, so whatever its lane takes is
            # in flight (sent, unanswered) when the worker is killed.
            os.kill(first.pid, signal.SIGSTOP)
            sids = await _submit_all(coord, engine)
            jobs = [coord.submissions._job(coord.ledger.submission(s)) for s in sids]
            expected = coord.submissions._validate(jobs, 0)
            await _until(lambda: first.in_flight, 10)
            held = list(first.in_flight)
            os.kill(first.pid, signal.SIGKILL)
            await _until(lambda: coord.ledger.pending_count() == 0, 30)
            assert first.starts == 2  # restarted
            assert held and set(held) <= set(sids)
            assert _verdicts(coord, sids) == [
                (c.verdict.outcome, c.verdict.check) for c in expected
            ]
            assert _verdicts(coord, sids) == [
                ("accept", "reward"),
                ("hard", "logprobs"),
                ("accept", "reward"),
            ]
            assert coord.submissions._losses == {}
            nursery.cancel_scope.cancel()

    try:
        trio.run(scenario)
    finally:
        pool.close()
        coord.close()
    assert not any(w.alive for w in pool.workers)


def _validate_in_process(tmp_path, wrap) -> list[tuple[str, str]]:
    """The verdicts of `_submit_all`'s three submissions, validated in process with the
    coordinator's `_validate` replaced by `wrap(validate, submission ids, jobs, current)`."""
    coord = _coordinator(tmp_path, validators=1)
    assert coord.submissions.pool is None  # in process is the default
    engine = HFEngine()
    engine.load(coord.policy.folder(0), 0)
    validate = coord.submissions._validate
    sids: list[int] = []
    coord.submissions._validate = lambda jobs, current: wrap(validate, sids, jobs, current)

    async def scenario():
        sids.extend(await _submit_all(coord, engine))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(coord.submissions.validate_forever)
            await _until(lambda: coord.ledger.pending_count() == 0, 60)
            nursery.cancel_scope.cancel()
        return _verdicts(coord, sids)

    try:
        return trio.run(scenario)
    finally:
        coord.close()


def test_in_process_is_the_default_and_batches_what_is_queued(tmp_path):
    batches = []

    def counting(validate, sids, jobs, current):
        batches.append(len(jobs))
        return validate(jobs, current)

    assert _validate_in_process(tmp_path, counting) == [
        ("accept", "reward"),
        ("hard", "logprobs"),
        ("accept", "reward"),
    ]
    assert batches == [3]


def test_a_submission_the_validator_fails_on_costs_that_submission_not_the_coordinator(tmp_path):
    """An error inside in-process validation (a validator bug one input meets; the LM head
    capture once read another thread's pass) used to end the validation lane, and with it the
    coordinator. Now the batch goes back, each submission alone; the one it fails on again is
    decided soft (with the strikes of a lost worker) and the others get their own verdicts."""

    def failing_on_the_first(validate, sids, jobs, current):
        if any(j.submission_id == sids[0] for j in jobs):
            raise IndexError("index 1 is out of bounds for dimension 0 with size 1")
        return validate(jobs, current)

    assert _validate_in_process(tmp_path, failing_on_the_first) == [
        ("soft", "worker"),
        ("hard", "logprobs"),
        ("accept", "reward"),
    ]


@pytest.mark.parametrize("workers", [-1, 65])
def test_validators_out_of_range_is_refused(workers):
    from protocol.errors import PoolSpecError
    from trainer.config import from_dict

    with pytest.raises(PoolSpecError, match="validators"):
        from_dict({"trainer": {"validators": workers}})


def test_every_lane_waiting_on_the_queue_wakes():
    # Two lanes wait on an empty queue; each push must reach a waiter, not only the last one
    # that started waiting.
    async def main():
        q = ValidationQueue()
        got = []

        async def lane():
            got.append((await q.pop()).submission_id)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lane)
                nursery.start_soon(lane)
                await trio.sleep(0.01)  # both are waiting now
                q.push(1, 0)
                await trio.sleep(0.01)
                q.push(2, 0)
        assert sorted(got) == [1, 2]

    trio.run(main)


class _Ledger:
    def __init__(self, nodes: dict[int, bytes]) -> None:
        self.rows = {sid: {"id": sid, "node": n, "outcome": None} for sid, n in nodes.items()}

    def submission(self, sid):
        return dict(self.rows[sid])


class _Admission:
    def __init__(self, newcomers: set[bytes]) -> None:
        self.newcomers = newcomers

    def tier(self, node: bytes) -> int:
        return 1 if node in self.newcomers else 0

    def probation_check_wait(self, now: float) -> float:
        return 0.0

    def charge_probation(self, seconds: float, now: float) -> None:
        self.charged = getattr(self, "charged", 0.0) + seconds


def _service(nodes: dict[int, bytes], newcomers: set[bytes]) -> SubmissionService:
    """The queueing part of a submission service: a ledger of undecided rows, two tiers."""
    return SubmissionService(
        None,
        _Ledger(nodes),
        _Admission(newcomers),
        *[None] * 6,
        on_verdict=lambda: None,
        on_ban=lambda _: None,
        batch=3,
    )


def test_a_batch_is_trusted_work_and_a_newcomers_or_a_lost_one_goes_alone():
    a, b, c, n1, n2 = (bytes([i]) * 32 for i in range(5))
    nodes = {1: a, 2: b, 3: a, 4: c, 5: n1, 6: n1, 7: n2, 8: a, 9: b}
    service = _service(nodes, {n1, n2})
    for sid, node in nodes.items():
        service.queue.push(sid, 1 if node in (n1, n2) else 0)
    service._losses[8] = 1  # a worker died holding 8 once

    async def batches():
        out = []
        while len(service.queue):
            out.append([row["id"] for row in await service.take_batch()])
        return out

    # In queue order, a batch ends at the first submission that may not join it: trusted
    # first, up to 3 (a node's several together); 8 was lost once, so it goes alone; 9 is
    # the last trusted one; then each newcomer's alone (the shared budget is charged after
    # a validation: a batch begun on its last second held the validator for all of it).
    assert trio.run(batches) == [[1, 2, 3], [4], [8], [9], [5], [6], [7]]


def test_a_batch_whose_worker_is_lost_is_requeued_and_one_lost_twice_alone_is_soft():
    n1, n2 = bytes([1]) * 32, bytes([2]) * 32
    service = _service({1: n1, 2: n2}, {n1, n2})
    recorded = []
    service._record = lambda row, c: recorded.append(
        (row["id"], c.verdict.outcome, c.verdict.check)
    )
    rows = [{"id": 1, "node": n1, "shared": True}, {"id": 2, "node": n2, "shared": True}]
    service._requeue_lost(rows, "worker 0 exited", 2.0)
    assert service._losses == {1: 1, 2: 1} and recorded == []
    queued = [service.queue.pop_nowait() for _ in range(2)]
    assert [(q.tier, q.submission_id) for q in queued] == [(1, 1), (1, 2)]
    service._requeue_lost(rows[:1], "worker 1 exited", 1.5)  # lost again, alone this time
    assert recorded == [(1, "soft", "worker")] and len(service.queue) == 0
    # What the failed attempts took is paid for as a verdict's seconds are: both on the
    # newcomers' shared budget, the one alone on its node's account too (with its verdict).
    assert service.admission.charged == 3.5 and service._lost_s == {1: 1.5}


def test_a_submission_that_kept_killing_workers_costs_strikes_and_other_soft_ones_none():
    from trainer.admission import LOST_WORKERS, PROVEN_CHEAT
    from trainer.submissions import LOST_WORKER_CHECK, verdict_strikes

    assert verdict_strikes(Verdict("soft", "lost twice", LOST_WORKER_CHECK)) == LOST_WORKERS > 0
    assert verdict_strikes(Verdict("hard", "bad proof", "toploc")) == PROVEN_CHEAT
    assert verdict_strikes(Verdict("soft", "stale", "staleness")) == 0.0
    assert verdict_strikes(Verdict("accept", "ok", "reward")) == 0.0
