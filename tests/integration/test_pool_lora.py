"""A LoRA pool as separate processes: the coordinator publishes adapter-only versions and a
node follows them, with every submission passing validation."""

import pytest

from tests.integration.pool import Coordinator, Node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_a_node_follows_adapter_versions_and_passes_validation(tmp_path):
    coordinator = Coordinator.create(tmp_path)
    node = Node("a", tmp_path / "nodes")
    try:
        coordinator.start(args=["--set", "trainer.lora.rank=4", "--set", "algorithm.lr=0.01"])
        node.start(coordinator.pool_id, coordinator.bootstrap)
        coordinator.wait_for(lambda s: s["version"] >= 2, 300, "two published versions")
        coordinator.wait_for(
            lambda s: all(n["weight_version"] >= 1 for n in coordinator.api("/api/nodes")),
            120,
            "the node reporting an adapter version in its heartbeats",
        )
        kinds = {v["version"]: v for v in coordinator.api("/api/versions")}
        assert kinds[2]["bytes"] < kinds[0]["bytes"] / 10  # adapters only
        verdicts = coordinator.api("/api/verdicts?limit=500")
        assert verdicts and all(v["outcome"] != "hard" for v in verdicts)
    finally:
        node.kill()
        coordinator.kill()
