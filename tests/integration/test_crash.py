"""SIGKILL the coordinator at random moments while a node works; it must resume losing nothing."""

import random
import signal
import sqlite3
import time

import pytest

from tests.integration.pool import Coordinator, Node

pytestmark = pytest.mark.timeout(900)


def ledger_facts(data) -> dict:
    db = sqlite3.connect(data / "ledger.sqlite")
    try:
        q = db.execute
        return {
            "ok": q("PRAGMA integrity_check").fetchone()[0],
            "accepted": {r[0] for r in q("SELECT id FROM groups")},
            "steps": [r[0] for r in q("SELECT step FROM steps ORDER BY step")],
            "versions": [r[0] for r in q("SELECT version FROM versions ORDER BY version")],
            "per_step": dict(
                q("""SELECT trained_step, COUNT(*) FROM groups
                     WHERE trained_step IS NOT NULL GROUP BY trained_step""")
            ),
        }
    finally:
        db.close()


def check(facts: dict, seen_accepted: set[int], last_version: int) -> None:
    assert facts["ok"] == "ok"
    assert seen_accepted <= facts["accepted"], "accepted groups were lost"
    steps = facts["steps"]
    assert steps == list(range(1, len(steps) + 1)), "steps must be 1..N without gaps"
    # every trained group belongs to a committed step, and each step trained one batch
    assert set(facts["per_step"]) <= set(steps)
    assert all(n == 2 for n in facts["per_step"].values())
    assert max(facts["versions"], default=0) >= last_version, "the version counter went back"


# 0: auto, which spaces checkpoints by what they cost, so a kill can also find several steps
# trained since the last one, all to be rolled back and retrained.
@pytest.mark.parametrize("checkpoint_every", [1, 0])
def test_sigkill_coordinator_repeatedly(tmp_path, checkpoint_every):
    rng = random.Random(7)
    coordinator = Coordinator.create(tmp_path, [f"trainer.checkpoint_every={checkpoint_every}"])
    node = Node("a", tmp_path / "nodes")
    try:
        coordinator.start()
        node.start(coordinator.pool_id, coordinator.bootstrap)
        coordinator.wait_for(lambda s: s["step"] >= 1, 300, "a first step")
        seen, last_version = set(), 0
        for _ in range(4):
            time.sleep(rng.uniform(1.0, 6.0))
            coordinator.kill(signal.SIGKILL)
            facts = ledger_facts(coordinator.data)
            check(facts, seen, last_version)
            seen, last_version = facts["accepted"], max(facts["versions"], default=0)
            coordinator.start()
            status = coordinator.wait_for(lambda s: True, 120, "restart")
            # it resumes exactly at the committed step, never behind the published version
            # (status["step"] itself may already have moved on: it trains as soon as it serves)
            resumed = status["resumed_from"]
            assert resumed["step"] == len(facts["steps"]) <= status["step"]
            assert resumed["version"] >= last_version
        done = len(ledger_facts(coordinator.data)["steps"])
        coordinator.wait_for(lambda s: s["step"] > done, 300, "progress after the restarts")
        coordinator.kill(signal.SIGKILL)
        check(ledger_facts(coordinator.data), seen, last_version)
    finally:
        node.kill()
        coordinator.kill()
