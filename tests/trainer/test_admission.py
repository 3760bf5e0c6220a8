"""The admission policy, case by case with hand-computed numbers (docs/security.md): probation,
shared newcomer budgets, join proof of work, quotas, releases, seeds, the ban window."""

import time
from functools import partial

import pytest
import trio

from protocol import pow
from protocol.envelope import EnvelopeVerifier
from protocol.identity import Identity
from protocol.inflight import Share
from protocol.poolspec import AdmissionSection
from tests.trainer.test_handlers import Member, _coordinator, _play
from trainer.admission import (
    PROBATION_PAUSE_S,
    PROVEN_CHEAT,
    QUOTA_RETRY_S,
    TRANSPORT_REFUSAL,
    VERDICT_RETRY_S,
    Admission,
    TokenBucket,
)
from trainer.coordinator import STRANGERS, Coordinator
from trainer.leases import LeaseBook, NothingToLease, draw, task_seed
from trainer.ledger import Decision, Ledger, Standing
from trainer.relays import admitted_peer
from trainer.submissions import ValidationQueue


def test_probation_one_small_lease_at_a_time_until_its_verdict(tmp_path):
    coord = _coordinator(tmp_path, lease_prompts=3)
    node = Member(coord)

    async def scenario():
        assert (await node.join()).accepted
        first = await node.lease()
        assert first.lease is not None and len(first.lease.tasks) == 1  # small: one prompt
        working = await node.lease()
        assert working.code == "quota"  # one at a time
        assert working.retry_after_s == QUOTA_RETRY_S  # it holds a lease it should work on
        assert (await node.submit(first.lease)).code == "queued"
        # answered, but no verdict yet: still no second lease, and the verdict comes soon
        judging = await node.lease()
        assert judging.code == "quota"
        assert judging.retry_after_s == VERDICT_RETRY_S < QUOTA_RETRY_S

    _play(coord, scenario)


def test_newcomers_share_lease_slots_and_trusted_work_is_not_counted_against_them(tmp_path):
    coord = _coordinator(tmp_path, admission={"probation_leases": 2})
    newcomers = [Member(coord) for _ in range(3)]
    veteran = Member(coord)

    async def scenario():
        for n in newcomers:
            await n.join()
        await veteran.join(trusted=True)
        assert (await newcomers[0].lease()).lease is not None
        assert (await newcomers[1].lease()).lease is not None
        assert (await newcomers[2].lease()).code == "busy"  # the 2 shared slots are taken
        assert (await veteran.lease()).lease is not None  # trusted work is unaffected

    _play(coord, scenario)


def test_unjudged_answers_of_newcomers_do_not_stop_leases_to_trusted_nodes(tmp_path):
    # A batch (8 prompts) of fresh keys answer their one-prompt probation leases with work
    # that waits behind all trusted work for its verdict. Counted as work coming, it told the
    # pool that a batch was on its way: every trusted lease request was refused `busy`.
    coord = _coordinator(tmp_path, batch_prompts=8, lease_prompts=4)
    veteran = Member(coord)

    async def scenario():
        await veteran.join(trusted=True)
        for _ in range(8):
            newcomer = Member(coord)
            await newcomer.join()
            reply = await newcomer.lease()
            assert reply.lease is not None and len(reply.lease.tasks) == 1
            assert (await newcomer.submit(reply.lease)).code == "queued"
        assert coord.ledger.pending_groups() == 0  # trusted work only
        work = await veteran.lease()
        assert work.code == "ok" and len(work.lease.tasks) == 4

    _play(coord, scenario)


def test_nodes_on_probation_share_one_submission_budget_on_the_transport(tmp_path):
    # Each key that answered a probation lease may resend for `lease_timeout_s`; were each
    # allowed its own per-peer budget, a few dozen fresh keys sending headers alone would hold
    # all the host buffers. Together they hold what the probation leases can bring.
    coord = _coordinator(tmp_path, admission={"probation_leases": 3}, max_submission_bytes=1 << 20)
    newcomers = [Member(coord) for _ in range(2)]
    veteran = Member(coord)

    async def scenario():
        for n in newcomers:
            await n.join()
        await veteran.join(trusted=True)
        shares = {coord._submission_share(n.key) for n in newcomers}
        assert shares == {Share("probation", 3 << 20)}
        assert coord._submission_share(veteran.key) is None
        # keys that never joined send joins and discovery queries from one budget too:
        # a flood of them cannot hold what members' heartbeats and leases need
        assert coord._stranger_share(Member(coord).key) == STRANGERS
        assert {coord._stranger_share(n.key) for n in [*newcomers, veteran]} == {None}

    _play(coord, scenario)


def test_a_soft_fault_on_probation_pauses_leasing_a_minute_then_four_then_the_window(
    tmp_path, monkeypatch
):
    # window 600 s, 8 s leases, each expiring unanswered. With k faults in the window, leasing
    # pauses min(600, 60 x 4^(k-1)) s from the latest: faults at T, T + 69 and T + 318.
    coord = _coordinator(tmp_path, lease_timeout_s=8.0)
    node = Member(coord)
    clock = [time.time()]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    node.verifier = EnvelopeVerifier(coord.pool_id, clock=time.time)  # the patched clock

    async def fault() -> float:
        lease = (await node.lease()).lease
        assert lease is not None
        clock[0] = lease.deadline_ms / 1000 + 1
        assert coord.leases.expire(clock[0]) == [lease.lease_id]
        return clock[0]

    async def paused_for(at: float) -> float:
        clock[0] = at
        reply = await node.lease()
        assert reply.lease is None and reply.code == "quota", reply
        return reply.retry_after_s

    async def scenario():
        await node.join()
        for pause in (PROBATION_PAUSE_S, 4 * PROBATION_PAUSE_S):
            at = await fault()
            assert await paused_for(at + pause - 2) == pytest.approx(2.0)
            clock[0] = at + pause + 0.01
        third = await fault()
        assert await paused_for(third + 200) == pytest.approx(400.0)  # 3 faults: the window
        # 283 s on, the first fault has left the window: two remain, so 240 s from the third
        clock[0] = third + 283
        assert (await node.lease()).lease is not None
        assert coord.ledger.node(node.key)["soft_faults"] == 3

    _play(coord, scenario)


def test_a_restarted_node_gives_back_the_leases_its_earlier_process_held(tmp_path):
    # a trusted node holds a lease when its process dies; the new process says so on joining
    coord = _coordinator(tmp_path)
    node, other = Member(coord), Member(coord)

    async def scenario():
        await node.join(trusted=True)
        await other.join(trusted=True)
        lost = (await node.lease()).lease
        assert (await node.join()).accepted  # an ordinary re-join keeps its work
        assert coord.ledger.lease(lost.lease_id)["state"] == "open"
        assert (await node.lease()).code == "quota"  # its one lease slot is taken
        assert (await node.join(fresh_start=True)).accepted
        assert coord.ledger.lease(lost.lease_id)["state"] == "released"
        assert coord.ledger.node(node.key)["soft_faults"] == 0  # within the allowance
        # the prompt goes out at once, to another node, and the restarted node leases again
        again = (await other.lease()).lease
        assert again.tasks[0].prompt_index == lost.tasks[0].prompt_index
        assert (await node.lease()).lease is not None
        assert (await node.join(fresh_start=True)).accepted  # a lease it holds goes too
        assert coord.ledger.node(node.key)["soft_faults"] == 0  # allowance 2

    _play(coord, scenario)


def test_a_proven_cheat_on_probation_bans_at_once(tmp_path):
    coord = _coordinator(tmp_path)
    node = Member(coord)

    async def scenario():
        await node.join()
        lease = (await node.lease()).lease
        assert (await node.submit(lease)).code == "queued"
        # a second, different answer to the answered lease: a lie (1 strike)
        assert (await node.submit(lease, token=7)).code == "refused"
        row = coord.ledger.node(node.key)
        assert row["banned_at"] is not None and "on probation" in row["ban_reason"]
        # its queued submission is dropped without a prefill
        pending = coord.ledger.submission((await node.submit(lease)).submission_id or 1)
        assert pending["outcome"] == "soft" and "banned" in pending["reason"]
        assert (await node.join()).code == "banned"

    _play(coord, scenario)


def test_new_identities_are_rate_limited_pool_wide_members_rejoin_freely(tmp_path):
    coord = _coordinator(tmp_path, admission={"new_identities_per_min": 2})
    members = [Member(coord) for _ in range(3)]

    async def scenario():
        assert (await members[0].join()).accepted
        assert (await members[1].join()).accepted
        third = await members[2].join()
        assert third.code == "busy" and 0 < third.retry_after_s <= 30  # 2/min: 30 s a token
        assert (await members[0].join()).accepted  # a member re-joining pays nothing

    _play(coord, scenario)


def test_join_proof_of_work(tmp_path):
    coord = _coordinator(tmp_path, admission={"join_pow_bits": 8})
    node = Member(coord)
    while pow.check(coord.pool_id, node.key, 0, 8):  # an unpaid join sends nonce 0, which
        node = Member(coord)  # meets 8 bits for 1 random key in 256: that one would join free
    nonce = pow.solve(coord.pool_id, node.key, 8)
    assert pow.check(coord.pool_id, node.key, nonce, 8)
    assert not pow.check(coord.pool_id, node.key, nonce, 30)

    async def scenario():
        from node.hardware import probe
        from protocol import messages as msg

        hw = probe("cpu", self_test_s=0.0)
        unpaid = await coord.on_join(node.signed(msg.JoinRequest(hw, "hf", "t")))
        assert unpaid.code == "bad_pow" and not coord.ledger.is_member(node.key)
        paid = await coord.on_join(node.signed(msg.JoinRequest(hw, "hf", "t", pow_nonce=nonce)))
        assert paid.accepted

    _play(coord, scenario)


def test_quota_grows_with_answered_leases_and_shrinks_with_expiries(tmp_path):
    # max_staleness 4 x batch 8 / 1 prompt a lease = 32 leases in flight; one node <= 16, and
    # max_leases_per_node 4. Quota = min(4, 1 + answered // 2) - expired.
    coord = _coordinator(tmp_path, max_staleness=4, batch_prompts=8)
    node = Member(coord)
    adm = coord.admission
    now = time.time()

    async def scenario():
        await node.join(trusted=True)
        assert adm.lease_terms(node.key, now, False).code == "ok"
        lease = (await node.lease()).lease
        assert adm.lease_terms(node.key, now, False).code == "quota"  # 1 open of 1
        await node.submit(lease)
        lease = (await node.lease()).lease
        await node.submit(lease)  # 2 answered: quota 2
        held = [(await node.lease()).lease for _ in range(2)]
        assert all(held) and (await node.lease()).code == "quota"
        coord.ledger.expire_leases(time.time() + 3600)  # both expire: quota 2 - 2 = 0
        assert (await node.lease()).code == "quota"
        assert coord.ledger.node(node.key)["soft_faults"] == 2

    assert adm.max_open == 4
    _play(coord, scenario)


def test_released_prompts_never_go_back_to_the_releaser_and_excess_releases_are_faults(tmp_path):
    # allowance 1: the second release in the window is a soft fault, and a trusted node's quota
    # (1 + answered // 2 = 1) minus its faults (1) leaves it no lease for the window
    coord = _coordinator(tmp_path, admission={"release_allowance": 1})
    rerolled, other = Member(coord), Member(coord)

    async def scenario():
        await rerolled.join(trusted=True)
        await other.join(trusted=True)
        given_up = []
        for _ in range(2):
            lease = (await rerolled.lease()).lease
            given_up.append(lease.tasks[0])
            assert (await rerolled.release(lease)).code == "released"
        assert coord.ledger.node(rerolled.key)["soft_faults"] == 1
        assert (await rerolled.lease()).code == "quota"
        taken = (await other.lease()).lease.tasks[0]  # an orphan, with a new draw's seed
        assert taken.prompt_index == given_up[0].prompt_index
        assert taken.seed != given_up[0].seed
        # whatever it is dealt later in the window, it is never a prompt it gave up
        book, window = coord.leases.book, coord.spec.admission.window_s
        barred, _ = coord.ledger.withheld_prompts(rerolled.key, time.time() - window)
        assert barred == {t.prompt_index for t in given_up}
        for counter in range(50):
            for p in book.plan(rerolled.key, 100 + counter, 1, barred=barred):
                assert p not in barred

    _play(coord, scenario)


def test_seed_depends_on_prompt_and_draw_only():
    assert task_seed(7, 3, 0) == task_seed(7, 3, 0)
    assert len({task_seed(7, 3, d) for d in range(50)}) == 50
    assert task_seed(7, 3, 0) != task_seed(7, 4, 0) != task_seed(8, 3, 0)
    book = LeaseBook(pool_seed=1, n_prompts=3)
    a, b = b"a" * 32, b"b" * 32
    book.return_prompts([0, 1])
    # `a` gave 0 and 1 up: it is never dealt them, by orphan or by a fresh draw
    assert all(book.plan(a, c, 1, barred=frozenset({0, 1})) == [2] for c in range(20))
    assert book.plan(b, 0, 2) == [0, 1]  # the orphans go to others first
    book.return_prompts([2])
    with pytest.raises(NothingToLease):
        book.plan(a, 99, 1, barred=frozenset({0, 1, 2}))  # everything is barred from it
    assert book.plan(a, 1, 1) == [2]  # nothing barred any more: the orphan is its


class _Rules:
    ban_window = 20
    probation_accepts = 2

    def __init__(self, adm: Admission) -> None:
        self.ban_reason = adm.ban_reason


def _admission(tmp_path, **cfg) -> Admission:
    ledger = Ledger(tmp_path / "l.sqlite")
    return Admission(
        AdmissionSection(**cfg), "pool", ledger, lease_prompts=4, in_flight_leases=4, now=0.0
    )


def test_ban_rule_hand_computed(tmp_path):
    adm = _admission(tmp_path)
    cheat = Decision("hard", "x", strikes=PROVEN_CHEAT)
    ok = Decision("accept", "ok")
    # on probation one proven cheat bans; a transport refusal does not
    assert adm.ban_reason(Standing(True, 0, 1.0), cheat) is not None
    assert adm.ban_reason(Standing(True, 0, 0.5), Decision("hard", "t", strikes=0.5)) is None
    # trusted: 2 strikes in the window ban, 1.5 do not
    assert adm.ban_reason(Standing(False, 9, 1.5), ok) is None
    assert adm.ban_reason(Standing(False, 9, 2.0), cheat) is not None
    assert adm.config.ban_strikes == TRANSPORT_REFUSAL * 4  # four refusals in 20 verdicts ban


def test_one_cheat_in_four_is_banned_by_the_window_where_a_running_sum_forgave_it(tmp_path):
    # The old rule (+1 per accept capped at 3, -3 per cheat, ban at -5) never banned this node.
    ledger = Ledger(tmp_path / "l.sqlite")
    adm = Admission(AdmissionSection(), "p", ledger, lease_prompts=1, in_flight_leases=4, now=0)
    key = b"k" * 32
    ledger.join(key, "peer", {}, "hf", 0.0)
    ledger.set_probation(key, False)
    pattern = ["accept", "accept", "accept", "hard"] * 3
    banned_at = None
    for i, outcome in enumerate(pattern):
        strikes = PROVEN_CHEAT if outcome == "hard" else 0.0
        _, banned = ledger.record_rejected(
            key, b"x", Decision(outcome, outcome, {}, strikes), adm, i
        )
        if banned:
            banned_at = i
            break
    assert banned_at == 7  # the second cheat, 8 verdicts in
    ledger.close()


def test_only_trusted_nodes_are_preferred_for_connection_slots(tmp_path):
    """What the coordinator's host keeps when strangers would fill it (`Host.prefer`): a free
    key that joined is not enough; past probation it is, until a ban."""
    adm = _admission(tmp_path)
    node = Identity.generate()
    key, peer_id = node.public_key, node.peer_id()
    preferred = partial(admitted_peer, adm.is_trusted)
    assert not adm.is_trusted(key) and not preferred(peer_id)  # never joined
    adm.ledger.join(key, peer_id, {}, "hf", 0.0)
    assert not preferred(peer_id)  # on probation
    adm.ledger.set_probation(key, False)
    assert preferred(peer_id)
    adm.ledger.ban(key, "test", None, 1.0)
    assert not preferred(peer_id)
    assert not preferred("not a peer id")


def test_validation_order_and_the_shared_budget():
    async def main():
        q = ValidationQueue()
        q.push(5, 1)
        q.push(6, 0)
        q.push(3, 1)
        q.push(9, 0)
        assert [(await q.pop()).submission_id for _ in range(4)] == [6, 9, 3, 5]

    trio.run(main)
    bucket = TokenBucket(rate=12 / 60, burst=2, now=0.0)  # 12 a minute, bursts of 2
    assert [bucket.take(0.0) for _ in range(2)] == [0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(5.0)  # one token every 5 s
    assert bucket.take(5.0) == 0.0
    # the newcomers' prefill budget: 6 s a minute, bursts of 1 s, charged after the fact
    seconds = TokenBucket(rate=6 / 60, burst=1.0, now=0.0)
    assert seconds.wait(0.0) == 0.0
    seconds.charge(3.0, 0.0)  # one long prefill overdraws it to -2 s
    assert seconds.wait(0.0) == pytest.approx(20.0, abs=0.01)  # 2 s at 0.1 s/s
    assert seconds.wait(20.1) == 0.0


def test_prefill_spend_beyond_accepted_work_moves_a_node_behind(tmp_path):
    adm = _admission(tmp_path, validation_allowance_s=10.0, validation_ratio=2.0)
    key = b"v" * 32
    adm.ledger.join(key, "peer", {}, "hf", 0.0)
    assert adm.tier(key) == 1  # on probation
    adm.ledger.set_probation(key, False)
    accept = Decision("accept", "ok", seconds=3.0)
    adm.ledger.record_rejected(key, b"x", accept, adm, 1.0)  # spent 3, earned 10 + 2 x 3 = 16
    assert adm.tier(key) == 0
    junk = Decision("soft", "stale", seconds=14.0)
    adm.ledger.record_rejected(key, b"x", junk, adm, 2.0)  # spent 17 > 16
    assert adm.tier(key) == 1


def test_leases_open_at_a_restart_get_a_full_term_not_a_fault(tmp_path):
    """The coordinator was down past a lease's deadline: on start the lease gets a full term,
    so its node can still submit and is not charged a soft fault for our outage."""
    coord = _coordinator(tmp_path, max_staleness=4, batch_prompts=8)
    node = Member(coord)

    async def scenario():
        await node.join(trusted=True)
        lease = (await node.lease()).lease
        back = lease.deadline_ms / 1000 + 60  # we come back after the deadline
        coord.leases.grant_outage_grace(back)
        assert coord.ledger.expire_leases(back + 1) == []
        assert coord.ledger.node(node.key)["soft_faults"] == 0
        limit = coord.spec.limits.lease_timeout_s
        assert coord.ledger.lease(lease.lease_id)["deadline"] == pytest.approx(back + limit)
        # Unanswered all the same: revoked, not a fault (a crash may have come between
        # recording the lease and sending it), so the node keeps its quota.
        assert coord.leases.expire(back + limit + 1) == [lease.lease_id]
        assert coord.ledger.lease(lease.lease_id)["state"] == "revoked"
        assert coord.ledger.node(node.key)["soft_faults"] == 0
        fresh = (await node.lease()).lease
        assert fresh is not None
        # a lease issued after the restart that expires is the node's fault, as always
        assert coord.leases.expire(fresh.deadline_ms / 1000 + 1) == [fresh.lease_id]
        assert coord.ledger.lease(fresh.lease_id)["state"] == "expired"
        assert coord.ledger.node(node.key)["soft_faults"] == 1

    _play(coord, scenario)


def test_prompts_given_up_stay_barred_across_a_coordinator_restart(tmp_path):
    # The bars come from the ledger: a coordinator started again on the same data never
    # deals a node the prompts it gave up in the window (they were kept in memory before).
    coord = _coordinator(tmp_path, batch_prompts=100, lease_prompts=2)
    node = Member(coord)
    given_up: set[int] = set()

    async def release_two():
        await node.join(trusted=True)
        for _ in range(2):
            lease = (await node.lease()).lease
            given_up.update(t.prompt_index for t in lease.tasks)
            assert (await node.release(lease)).code == "released"

    _play(coord, release_two)
    again = Coordinator(coord.spec, coord.identity, coord.options, coord.config)
    node.coord = again
    n_prompts = again.leases.book.n_prompts
    assert 0 < len(given_up) < n_prompts

    async def lease_after_restart():
        dealt = set()
        for _ in range(4):
            reply = await node.lease()
            assert reply.lease is not None, reply.reason
            dealt.update(t.prompt_index for t in reply.lease.tasks)
            await node.submit(reply.lease)
        assert dealt and not dealt & given_up

    _play(again, lease_after_restart)


def test_a_draw_passes_over_prompts_the_node_holds_while_another_is_free():
    book = LeaseBook(pool_seed=5, n_prompts=4)
    node = b"h" * 32
    start = draw(5, node, 0, 0, b"prompt") % 4
    assert book.plan(node, 0, 1) == [start]
    held = frozenset({start, (start + 1) % 4})
    assert book.plan(node, 0, 1, held=held) == [(start + 2) % 4]
    # one lease never holds a prompt twice while another is free
    assert len(set(book.plan(node, 0, 4))) == 4
    # every free prompt held (a pool smaller than a node's leases): it still leases
    assert book.plan(node, 0, 1, held=frozenset(range(4))) == [start]
    assert book.plan(node, 0, 1, barred=frozenset({start}), held=frozenset(range(4))) == [
        (start + 1) % 4
    ]
