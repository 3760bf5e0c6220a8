"""`coordinator run --trainer-procs 2`: a real pool whose trainer is two FSDP2 ranks under
torchrun. It trains; a SIGKILLed rank stops the whole run; the restart resumes at the committed
step with no accepted group lost and none trained twice."""

import os
import signal
import sqlite3
import time

import pytest

from tests.integration.pool import Coordinator, Node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def _ledger(data) -> tuple[int, set[int], dict[int, int]]:
    db = sqlite3.connect(data / "ledger.sqlite")
    try:
        steps = db.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
        accepted = {r[0] for r in db.execute("SELECT id FROM groups")}
        trained = dict(
            db.execute(
                "SELECT trained_step, COUNT(*) FROM groups WHERE trained_step IS NOT NULL "
                "GROUP BY trained_step"
            )
        )
        return steps, accepted, trained
    finally:
        db.close()


def _rank_pids(agent: int) -> list[int]:
    """The torchrun agent's child processes (the ranks)."""
    with open(f"/proc/{agent}/task/{agent}/children") as f:
        return [int(p) for p in f.read().split()]


def test_two_trainer_ranks_train_stop_together_and_resume(tmp_path):
    coordinator = Coordinator.create(tmp_path)
    node = Node("a", tmp_path / "nodes")
    try:
        coordinator.start(args=["--trainer-procs", "2"], timeout=200)
        node.start(coordinator.pool_id, coordinator.bootstrap)
        coordinator.wait_for(lambda s: s["step"] >= 2, 240, "two steps on two ranks")
        ranks = _rank_pids(coordinator.proc.pid)
        assert len(ranks) == 2
        os.kill(ranks[-1], signal.SIGKILL)
        # torchrun stops rank 0 (the coordinator) too, and exits with an error
        assert coordinator.proc.wait(timeout=60) != 0
        steps, seen, trained = _ledger(coordinator.data)
        assert steps >= 1 and set(trained) == set(range(1, steps + 1))

        coordinator.start(args=["--trainer-procs", "2"], timeout=200)
        status = coordinator.wait_for(lambda s: s["step"] > steps, 240, "progress after restart")
        assert status["resumed_from"]["step"] == steps
        time.sleep(1)
        coordinator.kill(signal.SIGTERM)
        after, accepted, trained = _ledger(coordinator.data)
        assert seen <= accepted and after >= steps
        assert all(n == 2 for n in trained.values())  # each committed step trained one batch
    finally:
        node.kill()
        coordinator.kill()
