"""`sampling.max_group_size` end to end: a real coordinator leases larger groups of a prompt
its accepted groups show to be flat, a real node generates them, and validation accepts them."""

import json
import sqlite3

import pytest

from tests.integration.pool import Coordinator, Node

pytestmark = pytest.mark.timeout(600)

# 1-digit copy: 0/1 rewards, which the untrained tiny model almost never earns, so a prompt's
# first group of 4 is flat and its estimate (0.5 / 5 = 0.1) asks for 22 samples, capped at 8
# (and a lease holds 2 x 4 = 8 samples at most).
SIZES = ["task.options={ digits = 1 }", "sampling.max_new_tokens=1", "sampling.max_group_size=8"]


def _ledger(data) -> tuple[list[list[int]], list[int]]:
    """(each lease's group sizes, each accepted group's size), from the ledger."""
    db = sqlite3.connect(data / "ledger.sqlite")
    try:
        leases = [
            [t["group_size"] for t in json.loads(tasks)]
            for (tasks,) in db.execute("SELECT tasks FROM leases WHERE tasks != '[]'")
        ]
        groups = [n for (n,) in db.execute("SELECT json_array_length(rewards) FROM groups")]
    finally:
        db.close()
    return leases, groups


def test_flat_prompts_get_larger_groups_within_the_lease_budget(tmp_path):
    coordinator = Coordinator.create(tmp_path, extra=SIZES)
    node = Node("a", tmp_path / "nodes")
    try:
        coordinator.start()
        node.start(coordinator.pool_id, coordinator.bootstrap)
        coordinator.wait_for(
            lambda s: 8 in _ledger(coordinator.data)[1],
            300,
            "an accepted group of 8 samples",
        )
        leases, groups = _ledger(coordinator.data)
        assert all(sum(sizes) <= 8 for sizes in leases)  # the lease budget holds
        assert {size for sizes in leases for size in sizes} <= {4, 8}
        assert any(sizes == [8] for sizes in leases)  # a large group fills a lease alone
        assert set(groups) <= {4, 8}
        verdicts = coordinator.api("/api/verdicts?limit=500")
        assert verdicts and all(v["outcome"] != "hard" for v in verdicts)
    finally:
        node.kill()
        coordinator.kill()
