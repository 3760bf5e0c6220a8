import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from trainer.ledger import MIGRATIONS, Decision, Ledger, LedgerError

A, B = b"a" * 32, b"b" * 32


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    yield led
    led.close()


def _lease(led, node=A, now=100.0, deadline=200.0):
    def build(lease_id, counter):
        return [{"prompt": 1, "seed": 9}], f"{lease_id}:{counter}".encode()

    lease_id, counter, _, body = led.issue_lease(node, now, deadline, 0, build)
    return lease_id, counter, body


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
    assert ledger.lease(first[0])["tasks"] == [{"prompt": 1, "seed": 9}]


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
    assert ledger.release_lease(kept, A) and not ledger.release_lease(kept, A)
    with pytest.raises(LedgerError, match="joined, unbanned"):
        _lease(ledger, node=B)


def test_verdicts_reputation_and_ban(ledger):
    ledger.join(A, "pA", {}, "hf", 1.0)
    subs = []
    for _ in range(3):
        lease_id, _, _ = _lease(ledger)
        subs.append(ledger.record_submission(lease_id, A, b"evidence", 150.0))
    open_lease, _, _ = _lease(ledger)
    groups = [(0, 5, 0, [1.0, 0.0], b"payload")]
    assert not ledger.decide(subs[0], Decision("accept", "ok", {}, 1.0, groups), -2.0, 160.0)
    bad_proof = Decision("hard", "bad proof", {"chunk": 0}, -2.0)
    assert not ledger.decide(subs[1], bad_proof, -2.0, 161.0)
    with pytest.raises(LedgerError, match="already decided"):
        ledger.decide(subs[1], Decision("hard", "again", {}, -2.0), -2.0, 161.0)
    assert ledger.decide(subs[2], Decision("hard", "bad sampling", {}, -2.0), -2.0, 162.0)
    node = ledger.node(A)
    assert (node["accepted"], node["hard_rejected"], node["reputation"]) == (1, 2, -3.0)
    assert "bad sampling" in node["ban_reason"] and node["ban_evidence"] == subs[2]
    assert ledger.lease(open_lease)["state"] == "revoked"
    assert not ledger.is_active(A)
    assert not ledger.join(A, "pA", {}, "hf", 200.0)  # a banned node stays banned
    assert ledger.submission(subs[2])["raw"] == b"evidence"


def test_groups_trained_at_most_once_and_stale_dropped(ledger):
    ledger.join(A, "pA", {}, "hf", 1.0)
    lease_id, _, _ = _lease(ledger)
    sub = ledger.record_submission(lease_id, A, b"r", 150.0)
    groups = [(i, i, v, [float(i), 0.0], b"p") for i, v in enumerate([0, 1, 2, 3])]
    ledger.decide(sub, Decision("accept", "ok", {}, 1.0, groups), -5.0, 160.0)
    assert ledger.drop_stale(min_version=1) == 1
    ready = ledger.trainable_groups(min_version=1, limit=2)
    assert [g.weight_version for g in ready] == [1, 2]
    ledger.commit_step(1, 1, [g.id for g in ready], {"reward": 0.5}, 170.0)
    with pytest.raises(LedgerError, match="already trained"):
        ledger.commit_step(2, 2, [ready[0].id], {}, 171.0)
    with pytest.raises(LedgerError, match="not after"):
        ledger.commit_step(1, 2, [], {}, 171.0)
    assert ledger.last_step() == (1, 1)
    assert [g.weight_version for g in ledger.trainable_groups(0, 10)] == [3]
    assert ledger.counts()["trained_groups"] == 2


WRITER = textwrap.dedent(
    """
    import sys, time
    from trainer.ledger import Decision, Ledger
    led = Ledger(sys.argv[1])
    key = b"n" * 32
    led.join(key, "p", {}, "hf", 0.0)
    step = led.last_step()[0]
    print("ready", flush=True)
    while True:
        lease_id, *_ = led.issue_lease(key, 0.0, 1e12, 0, lambda i, c: ([{}], b"s"))
        sub = led.record_submission(lease_id, key, b"raw", 1.0)
        group = (0, 0, 0, [1.0, 0.0], b"x" * 200)
        led.decide(sub, Decision("accept", "ok", groups=[group]), -9.0, 2.0)
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


def test_reputation_is_capped_and_early_refusals_count(ledger):
    ledger.join(A, "pA", {}, "hf", 1.0)
    for _ in range(6):
        lease_id, _, _ = _lease(ledger)
        sub = ledger.record_submission(lease_id, A, b"r", 150.0)
        ledger.decide(sub, Decision("accept", "ok", {}, 1.0), -5.0, 160.0)
    assert ledger.node(A)["reputation"] == 3.0  # capped
    twice = Decision("hard", "answered twice", {}, -4.0)
    sid, banned = ledger.record_rejected(A, b"dup", twice, -5.0, 170.0)
    assert not banned and ledger.submission(sid)["outcome"] == "hard"
    _, banned = ledger.record_rejected(A, b"dup2", twice, -5.0, 171.0)
    assert banned and ledger.node(A)["hard_rejected"] == 2
