"""A LoRA pool as separate processes: the coordinator publishes adapter-only versions and a
node follows them, with every submission passing validation; also with the trainer as two
FSDP2 ranks, through a SIGKILLed rank and the restart."""

import os
import signal

import pytest

from tests.integration.pool import Coordinator, Node
from tests.trainer.test_distributed_pool import _ledger, _rank_pids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

LORA = ["--set", "trainer.lora.rank=4", "--set", "algorithm.lr=0.01"]


def _follows_adapter_versions(coordinator: Coordinator, version: int) -> None:
    """Versions up to `version` are out, the node uses adapter versions, and no submission
    failed validation."""
    coordinator.wait_for(lambda s: s["version"] >= version, 300, f"version {version}")
    coordinator.wait_for(
        lambda s: all(n["weight_version"] >= 1 for n in coordinator.api("/api/nodes")),
        120,
        "the node reporting an adapter version in its heartbeats",
    )
    kinds = {v["version"]: v for v in coordinator.api("/api/versions")}
    assert kinds[version]["bytes"] < kinds[0]["bytes"] / 10  # adapters only
    verdicts = coordinator.api("/api/verdicts?limit=500")
    assert verdicts and all(v["outcome"] != "hard" for v in verdicts)


def test_a_node_follows_adapter_versions_and_passes_validation(tmp_path):
    coordinator = Coordinator.create(tmp_path)
    node = Node("a", tmp_path / "nodes")
    try:
        coordinator.start(args=LORA)
        node.start(coordinator.pool_id, coordinator.bootstrap)
        _follows_adapter_versions(coordinator, 2)
    finally:
        node.kill()
        coordinator.kill()


def test_two_lora_trainer_ranks_publish_adapter_versions_and_resume(tmp_path):
    coordinator = Coordinator.create(tmp_path)
    node = Node("a", tmp_path / "nodes")
    ranked = [*LORA, "--trainer-procs", "2"]
    try:
        coordinator.start(args=ranked, timeout=200)
        node.start(coordinator.pool_id, coordinator.bootstrap)
        _follows_adapter_versions(coordinator, 2)
        os.kill(_rank_pids(coordinator.proc.pid)[-1], signal.SIGKILL)
        assert coordinator.proc.wait(timeout=60) != 0  # torchrun stops rank 0 too
        steps = _ledger(coordinator.data)[0]

        coordinator.start(args=ranked, timeout=200)
        status = coordinator.wait_for(lambda s: s["step"] > steps, 240, "progress after restart")
        assert status["resumed_from"]["step"] == steps
        _follows_adapter_versions(coordinator, status["version"])
    finally:
        node.kill()
        coordinator.kill()
