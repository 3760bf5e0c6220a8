"""A multi-turn pool end to end: a coordinator, an honest node and a node that edits the
environment's replies, as separate processes."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.pool import Coordinator, Node, _env

# About 2 minutes on 2 busy cores (three processes loading torch, a trained step): slow.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

BYZANTINE = Path(__file__).resolve().parents[2] / "examples" / "byzantine.py"


def test_honest_transcripts_train_and_an_edited_tool_result_is_banned(tmp_path):
    coordinator = Coordinator.create(
        tmp_path,
        # The cheater submits only groups it could edit, and lets a lease with nothing to
        # edit expire: on probation such a fault pauses its leasing for a minute or more, at
        # most the admission window. A short window lets it try again within the test.
        [
            "task.name=guess",
            "task.options={ max_turns = 3 }",
            "sampling.max_new_tokens=4",
            "admission.window_s=15",
        ],
    )
    honest = Node("honest", tmp_path / "nodes")
    home = tmp_path / "nodes"
    cheat = None
    try:
        coordinator.start()
        honest.start(coordinator.pool_id, coordinator.bootstrap)
        cheat = subprocess.Popen(
            [
                sys.executable,
                str(BYZANTINE),
                "edit-tool-result",
                "--pool",
                coordinator.pool_id,
                "--bootstrap",
                coordinator.bootstrap,
                "--key",
                str(home / "cheat.key"),
                "--data-dir",
                str(home / "cheat"),
            ],
            env=_env(home),
            stdout=(home / "cheat.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        coordinator.wait_for(
            lambda s: any(n["status"] == "banned" for n in coordinator.api("/api/nodes")),
            150,
            "the cheater banned",
        )
        coordinator.wait_for(lambda s: s["version"] >= 1, 150, "a version trained on transcripts")
        nodes = coordinator.api("/api/nodes")
        banned = [n for n in nodes if n["status"] == "banned"]
        good = [n for n in nodes if n["status"] != "banned"]
        assert len(banned) == 1 and banned[0]["accepted"] == 0, nodes
        assert len(good) == 1 and good[0]["accepted"] > 0 and good[0]["hard_rejected"] == 0
        hard = [v for v in coordinator.api("/api/verdicts?limit=500") if v["outcome"] == "hard"]
        assert hard and all(v["check"] == "environment" for v in hard), hard
    finally:
        if cheat is not None and cheat.poll() is None:
            cheat.kill()
            cheat.wait(timeout=60)
        honest.kill()
        coordinator.kill()
