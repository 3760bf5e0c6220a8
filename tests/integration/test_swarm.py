"""The simulated swarm end to end: every kind of cheater across the run, with chaos.

Runs `examples/swarm.py` as the README does (a coordinator, a relay, honest nodes and cheating
nodes, each a separate OS process) and asserts on its JSON report, which is built from the
coordinator's API (and, for groups, its ledger).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def run_swarm(tmp_path: Path, *args: str, timeout: float) -> tuple[dict, str]:
    report = tmp_path / "report.json"
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "swarm.py"),
        "--workdir",
        str(tmp_path / "swarm"),
        "--report",
        str(report),
        "--progress-s",
        "30",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    text = out.stdout + out.stderr
    assert report.exists(), f"no report written (exit {out.returncode}):\n{text[-5000:]}"
    return json.loads(report.read_text()), text


def test_every_cheater_caught_with_chaos_while_the_pool_learns(tmp_path):
    from swarm import EXPECTED, KINDS, judged

    report, text = run_swarm(
        tmp_path,
        "--nodes", "2",
        "--relays", "1",
        "--byzantine", "all",  # 8 at once by default: 3, and one per bounded kind
        "--chaos",
        "--steps", "40",
        "--timeout", "1000",
        "--min-gain", "0.2",
        timeout=1100,
    )  # fmt: skip
    where = f"\n{text[-4000:]}"
    assert report["finished"], "the swarm did not finish its steps" + where
    assert report["steps"] == 40
    # every kind ran, and each was caught (banned) or bounded, as its kind expects
    kinds = {c["kind"]: c for c in report["cheaters"].values()}
    assert set(kinds) == set(KINDS)
    assert report["checks"]["every_kind_ran"] and not report["cheaters_never_started"]
    for kind, c in kinds.items():
        assert c["caught"], f"{kind} was not caught: {c['how']}" + where
    for n in report["nodes"]:
        # as the report judges a kind: a key admitted as training stopped leasing (the sybil
        # joins with key after key), or whose answer came after the last validation, was never
        # judged, and nothing it sent was accepted
        if n["role"] == "byzantine" and EXPECTED.get(n["kind"], "banned") == "banned":
            if judged(n):
                assert n["banned"] and n["ban_reason"], n
            else:
                assert n["accepted"] == 0 and n["trained_groups"] == 0, n
    flood = next(n for n in report["nodes"] if n["kind"] == "flood")
    assert flood["rate_limited"] > 0 and not flood["banned"]
    # the sybil paid for more than one key, and each key judged was banned
    sybil = kinds["sybil"]["keys"]
    sybil_judged = sum(1 for n in report["nodes"] if n["kind"] == "sybil" and judged(n))
    assert sybil_judged >= 2 and sybil["banned"] == sybil_judged, sybil
    # no group of a cheater that only cheats was ever trained
    assert report["cheater_groups_trained"] == {}, report["cheater_groups_trained"]
    # honest nodes: never a hard reject, and they did the work
    honest = [n for n in report["nodes"] if n["role"] == "honest"]
    assert len(honest) == 2
    assert report["honest_hard_rejects"] == 0, report["honest_hard_reject_details"]
    assert all(n["accepted"] > 0 for n in honest)
    # the pool kept learning through it all
    reward = report["reward"]
    assert reward["end"] - reward["start"] >= 0.2, reward
    # chaos happened, and the ledger kept its promises through the coordinator's SIGKILL
    events = [e["event"] for e in report["chaos"]]
    assert "chaos: SIGKILL coordinator" in events and "chaos: SIGKILL relay" in events
    assert sum(e == "chaos: node restarted" for e in events) >= 1
    assert len(report["crash_checks"]) == 1
    led = report["ledger"]
    assert led["steps_contiguous"] and led["one_batch_per_step"]
    assert led["duplicate_groups"] == 0
    assert led["groups_missing_from_accepted_submissions"] == 0
    assert led["groups_lost_across_crash"] == 0
    assert led["crash_resumed_at_committed_step"], report["crash_checks"]
    assert led["trained_and_dropped"] == 0
    # weights moved, counted by the servers themselves (since their last restart)
    served = report["bytes"]
    assert served["served_by_origin"] > 0 and served["served_by_relays"] is not None
    assert report["pace"]["versions"] > 0 and report["pace"]["median_s"] is not None
    assert report["ok"], report["checks"]
