"""A coordinator and nodes as separate processes: the node issue's scenarios, end to end."""

import json
import signal
import sqlite3
import time

import pytest

from tests.integration.pool import Coordinator, Node

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def pool(tmp_path):
    coordinator = Coordinator.create(tmp_path)
    nodes: list[Node] = []
    yield coordinator, nodes, tmp_path
    for n in nodes:
        n.kill()
    coordinator.kill()


def test_two_nodes_join_work_and_follow_versions(pool):
    coordinator, nodes, tmp = pool
    coordinator.start()
    for name in ("a", "b"):
        nodes.append(Node(name, tmp / "nodes"))
        nodes[-1].start(coordinator.pool_id, coordinator.bootstrap)
    status = coordinator.wait_for(lambda s: s["version"] >= 2, 300, "two published versions")
    assert status["counts"]["nodes"] == 2
    table = {n["key"]: n for n in coordinator.api("/api/nodes")}
    assert all(n["accepted"] > 0 and n["hard_rejected"] == 0 for n in table.values())
    # Both nodes generated with a version newer than 0 at some point: they follow the weights.
    coordinator.wait_for(
        lambda s: all(n["weight_version"] >= 1 for n in coordinator.api("/api/nodes")),
        120,
        "nodes reporting new weights in heartbeats",
    )
    verdicts = coordinator.api("/api/verdicts?limit=500")
    assert verdicts and all(v["outcome"] != "hard" for v in verdicts)
    # Each node's report of the weight bytes it fetched only grows, while versions follow
    # each other: a heartbeat sent to ask for the current version once blanked it.
    start, seen = coordinator.api("/api/status")["version"], {}
    while coordinator.api("/api/status")["version"] < start + 3:
        for n in coordinator.api("/api/weights")["nodes"]:
            total = sum(n["fetched"].values())
            assert total >= seen.get(n["key"], 1), n
            seen[n["key"]] = total
        time.sleep(0.3)
    assert len(seen) == 2
    # A node fetches each new version through its own relay, which lists it once mirrored:
    # asking it a moment too early must not fail the fetch (it failed about once a second;
    # a transfer too slow on a loaded machine may still fail one now and then).
    for n in nodes:
        assert n.text().count("no valid manifest") <= 2, n.text()[-2000:]


def _leases(data, node_key: bytes) -> list[tuple[int, str, list[int]]]:
    """(lease id, state, prompt indices) of a node's leases, read from the ledger."""
    db = sqlite3.connect(data / "ledger.sqlite")
    try:
        rows = db.execute(
            "SELECT id, state, tasks FROM leases WHERE node = ? ORDER BY id", (node_key,)
        ).fetchall()
    finally:
        db.close()
    return [(i, st, [t["prompt_index"] for t in json.loads(tasks)]) for i, st, tasks in rows]


def _key(node: Node) -> bytes:
    return bytes.fromhex(json.loads((node.home / f"{node.name}.key").read_text())["public_key"])


def _kill_holding_a_lease(coordinator: Coordinator, a: Node) -> tuple[int, str, list[int]]:
    """SIGKILL `a` while it holds an open lease; returns that lease. A lease is open only
    while a generates (ms on the tiny model), so freeze a (SIGSTOP) when the ledger shows one,
    let a submission already on the wire land, and kill it only if the lease is still open;
    otherwise let it go on."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if (a.home / f"{a.name}.key").exists() and (coordinator.data / "ledger.sqlite").exists():
            seen = next((x for x in _leases(coordinator.data, _key(a)) if x[1] == "open"), None)
            if seen is not None:
                a.proc.send_signal(signal.SIGSTOP)
                time.sleep(0.5)
                state = {i: st for i, st, _ in _leases(coordinator.data, _key(a))}
                if state[seen[0]] == "open":
                    a.kill(signal.SIGKILL)
                    return seen
                a.proc.send_signal(signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError(f"node {a.name} was never caught holding an open lease")


def test_killed_node_lease_goes_to_the_other(pool):
    coordinator, nodes, tmp = pool
    coordinator.start()
    a, b = Node("a", tmp / "nodes"), Node("b", tmp / "nodes")
    nodes += [a, b]
    a.start(coordinator.pool_id, coordinator.bootstrap)
    held = _kill_holding_a_lease(coordinator, a)
    lease_id, _, prompts = held
    b.start(coordinator.pool_id, coordinator.bootstrap)
    # the lease expires (8 s) and its prompts are the first ones leased to b after that
    deadline = time.monotonic() + 240
    reissued = False
    while time.monotonic() < deadline and not reissued:
        states = {i: st for i, st, _ in _leases(coordinator.data, _key(a))}
        if states[lease_id] == "expired" and (tmp / "nodes" / "b.key").exists():
            reissued = any(set(prompts) <= set(p) for _, _, p in _leases(coordinator.data, _key(b)))
        time.sleep(0.5)
    assert states[lease_id] == "expired"
    assert reissued, f"prompts {prompts} of a's expired lease were not leased to b"
    before = coordinator.api("/api/status")["counts"]["submissions"]
    coordinator.wait_for(lambda s: s["counts"]["submissions"] > before, 180, "b working on")


def test_a_restarted_node_gives_back_the_lease_its_killed_process_held(tmp_path):
    # Leases long enough that the node is back before its lost lease would expire: its first
    # join says it holds nothing, so the lease is released then (no soft fault: within the
    # allowance), instead of expiring minutes later as a fault that would pause its leasing.
    coordinator = Coordinator.create(tmp_path, ["limits.lease_timeout_s=300.0"])
    a = Node("a", tmp_path / "nodes")
    try:
        coordinator.start()
        a.start(coordinator.pool_id, coordinator.bootstrap)
        lease_id, _, _ = _kill_holding_a_lease(coordinator, a)
        a.start(coordinator.pool_id, coordinator.bootstrap)
        coordinator.wait_for(
            lambda s: (
                {i: st for i, st, _ in _leases(coordinator.data, _key(a))}[lease_id] == "released"
            ),
            120,
            "the lost lease released by the restarted node's join",
        )
        before = coordinator.api("/api/status")["counts"]["submissions"]
        coordinator.wait_for(
            lambda s: s["counts"]["submissions"] > before, 120, "the restarted node working on"
        )
        (row,) = [n for n in coordinator.api("/api/nodes") if n["status"] != "banned"]
        assert row["soft_faults"] == 0, row
    finally:
        a.kill()
        coordinator.kill()


def test_coordinator_restart_nodes_reconnect(pool):
    coordinator, nodes, tmp = pool
    coordinator.start()
    node = Node("a", tmp / "nodes")
    nodes.append(node)
    node.start(coordinator.pool_id, coordinator.bootstrap)
    coordinator.wait_for(lambda s: s["counts"]["submissions"] >= 2, 180, "first submissions")
    coordinator.kill(signal.SIGKILL)
    time.sleep(3)
    coordinator.start()
    before = coordinator.api("/api/status")["counts"]["submissions"]
    coordinator.wait_for(
        lambda s: s["counts"]["submissions"] >= before + 2, 240, "submissions after restart"
    )
    assert node.proc.poll() is None, node.text()[-2000:]


def test_node_refuses_wrong_pool_and_graceful_stop(pool):
    coordinator, nodes, tmp = pool
    coordinator.start()
    wrong = Node("wrong", tmp / "nodes")
    nodes.append(wrong)
    other_id = "a" * len(coordinator.pool_id)
    wrong.start(other_id, coordinator.bootstrap)
    # discovery keeps failing (nobody has a record for that pool); it says why, and SIGINT
    # stops it cleanly
    deadline = time.monotonic() + 60
    while "could not find the coordinator" not in wrong.text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "could not find the coordinator" in wrong.text()
    wrong.kill(signal.SIGINT)
    assert wrong.proc.returncode == 0

    good = Node("good", tmp / "nodes")
    nodes.append(good)
    good.start(coordinator.pool_id, coordinator.bootstrap)
    coordinator.wait_for(lambda s: s["counts"]["submissions"] >= 1, 180, "a submission")
    good.kill(signal.SIGTERM)
    assert good.proc.returncode == 0, good.text()[-2000:]
    assert "node stopped" in good.text()


def test_relaying_node_serves_weights_to_others(pool):
    import subprocess
    import sys

    from tests.integration.pool import free_port

    coordinator, nodes, tmp = pool
    coordinator.start()
    relay_port = free_port()
    relayer = Node("relayer", tmp / "nodes")
    nodes.append(relayer)
    relayer.start(coordinator.pool_id, coordinator.bootstrap, "--relay", str(relay_port))
    coordinator.wait_for(
        lambda s: s["counts"]["submissions"] >= 1, 180, "the relaying node working"
    )
    relay_url = f"http://127.0.0.1:{relay_port}"
    assert relay_url in coordinator.api("/api/status")["weights_urls"]
    # another client, given only the relaying node as a source, gets verified weights
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "shardcast",
            "fetch",
            "--source",
            relay_url,
            "--dest",
            str(tmp / "other"),
            "--pool",
            str(coordinator.spec),
            "--version",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp / "other" / "v0" / "model.safetensors").exists()
