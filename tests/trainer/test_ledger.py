import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from protocol.poolspec import AdmissionSection
from trainer.admission import Admission
from trainer.dashboard.rows import contributions_json
from trainer.ledger import MIGRATIONS, Decision, Ledger, LedgerError, NewGroup

A, B = b"a" * 32, b"b" * 32


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    yield led
    led.close()


def _lease(led, node=A, now=100.0, deadline=200.0):
    def build(lease_id, counter, draws):
        return [{"prompt": p, "draw": d} for p, d in draws], f"{lease_id}:{counter}".encode()

    lease_id, counter, _, body = led.issue_lease(node, now, deadline, 0, lambda c: [1], build)
    return lease_id, counter, body


def _rules(led, **cfg):
    return Admission(AdmissionSection(**cfg), "p", led, lease_prompts=1, in_flight_leases=4, now=0)


def _group(i, version, rewards, payload=b"p"):
    return NewGroup(i, i, version, rewards, [0.5, -0.5], payload, 2)


def test_schema_is_versioned_and_wal(ledger, tmp_path):
    assert ledger.schema_version == len(MIGRATIONS)
    assert ledger._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db = sqlite3.connect(tmp_path / "ledger.sqlite")
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(LedgerError, match="upgrade swarmrl"):
        Ledger(tmp_path / "ledger.sqlite")


def test_lease_counter_and_body(ledger):
    ledger.join(A, "peerA", {"device": "cpu"}, "hf", 1.0)
    first = _lease(ledger)
    second = _lease(ledger)
    assert (first[1], second[1]) == (0, 1)
    assert ledger.lease(first[0])["body"] == f"{first[0]}:0".encode()
    # the prompt's draw counter advanced with each lease: seeds never repeat
    assert ledger.lease(first[0])["tasks"] == [{"prompt": 1, "draw": 0}]
    assert ledger.lease(second[0])["tasks"] == [{"prompt": 1, "draw": 1}]


def test_lease_answered_once_and_only_by_its_node(ledger):
    ledger.join(A, "pA", {}, "hf", 1.0)
    ledger.join(B, "pB", {}, "hf", 1.0)
    lease_id, _, _ = _lease(ledger)
    with pytest.raises(LedgerError, match="another node"):
        ledger.record_submission(lease_id, B, b"raw", 150.0)
    with pytest.raises(LedgerError, match="past its deadline"):
        ledger.record_submission(lease_id, A, b"raw", 250.0)
    sub = ledger.record_submission(lease_id, A, b"raw", 150.0)
    with pytest.raises(LedgerError, match="already answered"):
        ledger.record_submission(lease_id, A, b"raw2", 151.0)
    assert ledger.pending_submissions() == [sub] and ledger.counts()["pending"] == 1
    with pytest.raises(LedgerError, match="does not exist"):
        ledger.record_submission(999, A, b"raw", 150.0)


def test_expiry_release_and_unknown_nodes(ledger):
    ledger.join(A, "pA", {}, "hf", 1.0)
    old, _, _ = _lease(ledger, deadline=110.0)
    kept, _, _ = _lease(ledger, deadline=500.0)
    assert ledger.expire_leases(now=120.0) == [old]
    assert ledger.lease(old)["state"] == "expired"
    assert ledger.node(A)["soft_faults"] == 1  # an expiry is a soft fault
    assert ledger.release_lease(kept, A, 130.0) and not ledger.release_lease(kept, A, 131.0)
    seen = ledger.activity(A, since=115.0)
    assert (seen.open, seen.expired, seen.released) == (0, 1, 1)
    with pytest.raises(LedgerError, match="joined, unbanned"):
        _lease(ledger, node=B)


def test_verdicts_strikes_and_ban(ledger):
    rules = _rules(ledger)
    ledger.join(A, "pA", {}, "hf", 1.0)
    ledger.set_probation(A, False)
    subs = []
    for _ in range(4):
        lease_id, _, _ = _lease(ledger)
        subs.append(ledger.record_submission(lease_id, A, b"evidence", 150.0))
    open_lease, _, _ = _lease(ledger)
    accept = Decision("accept", "ok", {}, 0.0, [_group(0, 0, [1.0, 0.0])], seconds=2.0)
    assert not ledger.decide(subs[0], accept, rules, 160.0)
    bad_proof = Decision("hard", "bad proof", {"chunk": 0}, 1.0, seconds=1.5)
    assert not ledger.decide(subs[1], bad_proof, rules, 161.0)
    with pytest.raises(LedgerError, match="already decided"):
        ledger.decide(subs[1], Decision("hard", "again", {}, 1.0), rules, 161.0)
    assert ledger.decide(subs[2], Decision("hard", "bad sampling", {}, 1.0), rules, 162.0)
    node = ledger.node(A)
    assert (node["accepted"], node["hard_rejected"], node["reputation"]) == (1, 2, -2.0)
    assert (node["verified_tokens"], node["validation_s"], node["accepted_validation_s"]) == (
        2,
        3.5,
        2.0,
    )
    assert "bad sampling" in node["ban_reason"] and node["ban_evidence"] == subs[2]
    assert ledger.lease(open_lease)["state"] == "revoked"
    # what it sent and we had not checked is dropped unchecked
    assert ledger.submission(subs[3])["outcome"] == "soft"
    assert ledger.pending_count(A) == 0
    assert not ledger.is_active(A)
    assert not ledger.join(A, "pA", {}, "hf", 200.0)  # a banned node stays banned
    assert ledger.submission(subs[2])["raw"] == b"evidence"
    (row,) = ledger.contributions()
    assert (row["accepted_groups"], row["verified_tokens"], row["banned"]) == (1, 2, True)
    (shown,) = contributions_json(ledger.contributions())  # what /api/contributions serves
    assert shown["status"] == "banned" and shown["key"] == A.hex()
    assert (row["leases_issued"], row["leases_open"]) == (5, 0)


def test_groups_trained_at_most_once_and_stale_dropped(ledger):
    ledger.join(A, "pA", {}, "hf", 1.0)
    lease_id, _, _ = _lease(ledger)
    sub = ledger.record_submission(lease_id, A, b"r", 150.0)
    groups = [_group(i, v, [float(i), 0.0]) for i, v in enumerate([0, 1, 2, 3])]
    ledger.decide(sub, Decision("accept", "ok", {}, 0.0, groups), _rules(ledger), 160.0)
    assert ledger.drop_stale(min_version=1) == 1
    ready = ledger.trainable_groups(min_version=1, limit=2)
    assert [g.weight_version for g in ready] == [1, 2]
    assert ready[0].advantages == [0.5, -0.5]
    ledger.commit_step(1, 1, [g.id for g in ready], {"reward": 0.5}, 170.0, {ready[0].id: [1, -1]})
    assert (
        ledger._db.execute("SELECT advantages FROM groups WHERE id = ?", (ready[0].id,)).fetchone()[
            0
        ]
        == "[1, -1]"
    )
    with pytest.raises(LedgerError, match="already trained"):
        ledger.commit_step(2, 2, [ready[0].id], {}, 171.0)
    with pytest.raises(LedgerError, match="not after"):
        ledger.commit_step(1, 2, [], {}, 171.0)
    assert ledger.last_step() == (1, 1)
    assert [g.weight_version for g in ledger.trainable_groups(0, 10)] == [3]
    assert ledger.counts()["trained_groups"] == 2
    page = ledger.groups_page(since_id=ready[0].id, limit=10)
    assert [g["weight_version"] for g in page] == [2, 3] and page[0]["trained_step"] == 1
    assert page[0]["node"] == A and page[0]["lease_id"] == lease_id
    assert ledger.integrity() == {"duplicate_groups": 0, "missing_groups": 0}
    assert ledger.counts()["outcome_accept"] == 1


WRITER = textwrap.dedent(
    """
    import sys, time
    from protocol.poolspec import AdmissionSection
    from trainer.admission import Admission
    from trainer.ledger import Decision, Ledger, NewGroup
    led = Ledger(sys.argv[1])
    rules = Admission(AdmissionSection(), "p", led, lease_prompts=1, in_flight_leases=4, now=0)
    key = b"n" * 32
    led.join(key, "p", {}, "hf", 0.0)
    step = led.last_step()[0]
    print("ready", flush=True)
    while True:
        plan, build = (lambda c: [0]), (lambda i, c, d: ([{}], b"s"))
        lease_id, *_ = led.issue_lease(key, 0.0, 1e12, 0, plan, build)
        sub = led.record_submission(lease_id, key, b"raw", 1.0)
        group = NewGroup(0, 0, 0, [1.0, 0.0], [0.5, -0.5], b"x" * 200, 2)
        led.decide(sub, Decision("accept", "ok", groups=[group]), rules, 2.0)
        groups = led.trainable_groups(0, 3)
        if len(groups) == 3:
            step += 1
            led.commit_step(step, step, [g.id for g in groups], {}, 3.0)
    """
)


def test_sigkill_at_random_moments_leaves_a_consistent_ledger(tmp_path):
    path = tmp_path / "crash.sqlite"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for delay in (0.3, 0.7, 0.45, 1.1, 0.2):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path)], stdout=subprocess.PIPE, env=env
        )
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    led = Ledger(path)
    db = led._db
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # every answered lease has exactly one submission, and every submission answers one lease
    assert (
        db.execute(
            """SELECT COUNT(*) FROM leases l WHERE state = 'answered'
           AND (SELECT COUNT(*) FROM submissions s WHERE s.lease_id = l.id) != 1"""
        ).fetchone()[0]
        == 0
    )
    # a decided submission has its groups; trained groups belong to recorded steps, 3 per step
    assert (
        db.execute(
            """SELECT COUNT(*) FROM submissions s WHERE outcome = 'accept'
           AND (SELECT COUNT(*) FROM groups g WHERE g.submission_id = s.id) != 1"""
        ).fetchone()[0]
        == 0
    )
    per_step = db.execute(
        """SELECT trained_step, COUNT(*) FROM groups WHERE trained_step IS NOT NULL
           GROUP BY trained_step"""
    ).fetchall()
    assert per_step and all(n == 3 for _, n in per_step)
    assert {s for s, _ in per_step} == {r[0] for r in db.execute("SELECT step FROM steps")}
    # the runs made progress across restarts: steps numbered 1..N without gaps
    steps = [r[0] for r in db.execute("SELECT step FROM steps ORDER BY step")]
    assert steps == list(range(1, len(steps) + 1))
    led.close()


def test_accepted_work_does_not_repay_strikes_and_early_refusals_count(ledger):
    rules = _rules(ledger)
    ledger.join(A, "pA", {}, "hf", 1.0)
    ledger.set_probation(A, False)
    for _ in range(6):
        lease_id, _, _ = _lease(ledger)
        sub = ledger.record_submission(lease_id, A, b"r", 150.0)
        ledger.decide(sub, Decision("accept", "ok"), rules, 160.0)
    assert ledger.node(A)["reputation"] == 0.0  # no strikes; nothing banked either
    twice = Decision("hard", "answered twice", {}, 1.0)
    sid, banned = ledger.record_rejected(A, b"dup", twice, rules, 170.0)
    assert not banned and ledger.submission(sid)["outcome"] == "hard"
    _, banned = ledger.record_rejected(A, b"dup2", twice, rules, 171.0)
    assert banned and ledger.node(A)["hard_rejected"] == 2


def test_share_of_groups_not_dropped_for_a_reason_over_the_newest(ledger):
    assert ledger.share_not_dropped_for("flat", newest=4) is None
    ledger.join(A, "pA", {}, "hf", 1.0)
    for dropped in (["flat", "flat", None], ["flat", "stale", None]):
        lease_id, _, _ = _lease(ledger)
        sub = ledger.record_submission(lease_id, A, b"r", 150.0)
        groups = [NewGroup(i, i, 0, [1, 0], [0.5, -0.5], b"p", 2, d) for i, d in enumerate(dropped)]
        ledger.decide(sub, Decision("accept", "ok", {}, 0.0, groups), _rules(ledger), 160.0)
    # the six groups in order: flat, flat, None, flat, stale, None; the newest four hold
    # one flat
    assert ledger.share_not_dropped_for("flat", newest=4) == 3 / 4
    assert ledger.share_not_dropped_for("flat", newest=100) == 3 / 6
    assert ledger.share_not_dropped_for("stale", newest=100) == 5 / 6
