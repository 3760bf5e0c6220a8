"""A validator on another machine (`coordinator validator`): it reads the spec from the
coordinator's validator port, fetches weights over SHARDCAST, and validates every submission
of a pool whose coordinator validates nothing itself."""

import json
import sqlite3
import subprocess
import sys

import pytest

from tests.integration.pool import Coordinator, Node, _env, free_port

pytestmark = pytest.mark.timeout(600)

TOKEN = "a-validator-token-for-this-test"


def _validators_of_decided(data) -> list[str]:
    """Who validated each submission that went through validation (refusals at receipt,
    such as late answers, never reach a validator)."""
    db = sqlite3.connect(data / "ledger.sqlite")
    try:
        rows = db.execute("SELECT details FROM submissions WHERE outcome IS NOT NULL").fetchall()
    finally:
        db.close()
    details = [json.loads(d) for (d,) in rows if d]
    return [d.get("validator", "here") for d in details if "check" in d]


def _validator(url: str, token_file, tmp, name: str) -> subprocess.Popen:
    log = tmp / f"{name}.log"
    cmd = [sys.executable, "-m", "trainer", "validator", url, "--token-file", str(token_file)]
    cmd += ["--name", name, "--data-dir", str(tmp / name), "--quiet"]
    return subprocess.Popen(
        cmd, env=_env(tmp / "home"), stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def test_a_remote_validator_validates_every_submission(tmp_path):
    coordinator = Coordinator.create(tmp_path)
    port = free_port()
    token = tmp_path / "validator-token.txt"
    token.write_text(TOKEN)
    wrong = tmp_path / "wrong-token.txt"
    wrong.write_text("not-the-token")
    url = f"http://127.0.0.1:{port}"
    node = Node("a", tmp_path / "nodes")
    procs: list[subprocess.Popen] = []
    try:
        coordinator.start(
            args=[
                "--validator-listen", f"127.0.0.1:{port}",
                "--validator-token-file", str(token),
                "--set", "trainer.local_validation=false",
                "--set", "trainer.remote_timeout_s=10",
            ]
        )  # fmt: skip
        # a wrong token is refused before anything loads, with a clear error
        refused = subprocess.run(
            [sys.executable, "-m", "trainer", "validator", url, "--token-file", str(wrong)],
            env=_env(tmp_path / "home"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 2 and "refused the validator token" in refused.stderr
        procs.append(_validator(url, token, tmp_path, "remote-1"))
        node.start(coordinator.pool_id, coordinator.bootstrap)
        coordinator.wait_for(
            lambda s: s["version"] >= 1, 300, "a step on remotely validated groups"
        )
        validated_by = _validators_of_decided(coordinator.data)
        assert validated_by and set(validated_by) == {"remote:remote-1"}
        verdicts = coordinator.api("/api/verdicts?limit=500")
        assert verdicts and all(v["outcome"] != "hard" for v in verdicts)
        # killed, maybe holding a batch: it comes back after remote_timeout_s, and another
        # validator carries on; nothing received is lost
        procs[0].kill()
        procs[0].wait(timeout=60)
        version = coordinator.api("/api/status")["version"]
        procs.append(_validator(url, token, tmp_path, "remote-2"))
        # Wait for the second validator's verdicts, not only for a step: groups the first had
        # validated before it died can fill the next batch on their own (seen once in CI).
        coordinator.wait_for(
            lambda s: (
                s["version"] >= version + 1
                and "remote:remote-2" in _validators_of_decided(coordinator.data)
            ),
            300,
            "the second validator's verdicts and a step after the first one died",
        )
        integrity = coordinator.api("/api/ledger/integrity")
        assert all(v == 0 for v in integrity.values()), integrity
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=60)
        node.kill()
        coordinator.kill()
