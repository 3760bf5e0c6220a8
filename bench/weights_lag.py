"""How fast new weights reach the nodes' leases, and what that does to a pool's step rate.

A real pool as the browser tests run it (coordinator, two honest nodes fetching through their
own relays, alice also serving on a fixed port, one cheating node; all processes on this
machine, the tiny preset with the integration tests' fast settings) trains for `--seconds`
after its first step. From the coordinator's ledger: versions published (steps), seconds from
each version's publication to the first lease on it, and the staleness of every lease (the
newest version at issue minus the lease's); from the honest nodes' logs, their warnings.

`--trees` runs each given checkout's own code (each process is started from that folder), in
alternating rounds, so before/after ratios come from one run on one noisy machine:

    python bench/weights_lag.py --quick                          # this tree, one 45 s pool
    git worktree add /tmp/before <rev>
    python bench/weights_lag.py --trees /tmp/before . --rounds 2 --json lag.json
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/protocol.py would otherwise shadow the `protocol` package

from tests.integration.pool import Coordinator, Node, start_relaying_nodes  # noqa: E402


def run_pool(tree: Path, work: Path, seconds: float) -> dict[str, Any]:
    """One pool from `tree`'s code, trained for `seconds` after its first step."""
    here = Path.cwd()
    os.chdir(tree)  # `python -m trainer` / `-m node` then import this tree's packages
    try:
        coordinator = Coordinator.create(work)
        coordinator.start()
        nodes: list[Node] = []
        try:
            start_relaying_nodes(coordinator, work / "nodes", nodes)
            coordinator.wait_for(lambda s: s["step"] >= 1, 300, "a first step")
            time.sleep(seconds)
        finally:
            for n in nodes:
                n.kill()
            coordinator.kill()
    finally:
        os.chdir(here)
    out = ledger_figures(coordinator.data / "ledger.sqlite")
    out["node_warnings"] = sum(n.text().count(" WARNING ") for n in nodes[:2])  # the honest
    return out


def ledger_figures(path: Path) -> dict[str, Any]:
    db = sqlite3.connect(path)
    try:
        published = dict(db.execute("SELECT version, published_at FROM versions"))
        first = dict(
            db.execute("SELECT weight_version, MIN(issued_at) FROM leases GROUP BY weight_version")
        )
        leases = db.execute("SELECT issued_at, weight_version FROM leases").fetchall()
    finally:
        db.close()
    order = sorted(published.items(), key=lambda vp: vp[1])
    # the first versions wait for the nodes to start, not for the weights to travel
    delays = [first[v] - t for v, t in published.items() if v in first and v > 2]
    stale = [max((v for v, t in order if t <= at), default=0) - held for at, held in leases]
    return {
        "versions": len(published),
        "first_lease_s_median": statistics.median(delays) if delays else None,
        "never_leased": sum(1 for v in published if v not in first),
        "lease_staleness_mean": statistics.mean(stale) if stale else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trees", nargs="+", type=Path, default=[ROOT], help="checkouts to compare")
    ap.add_argument("--seconds", type=float, default=90.0, help="training time per pool")
    ap.add_argument("--rounds", type=int, default=1, help="pools per tree, alternated")
    ap.add_argument("--quick", action="store_true", help="45 s pools, one round")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()
    seconds = 45.0 if args.quick else args.seconds
    rows = []
    for r in range(1 if args.quick else args.rounds):
        for tree in args.trees:
            with tempfile.TemporaryDirectory(prefix="weights-lag-") as work:
                figures = run_pool(tree.resolve(), Path(work), seconds)
            row = {"tree": str(tree), "round": r, **figures}
            rows.append(row)
            print(
                f"{row['tree']:<28} round {r}: {row['versions']:4d} versions in {seconds:.0f} s, "
                f"first lease {row['first_lease_s_median']:.2f} s after publishing (median), "
                f"lease staleness {row['lease_staleness_mean']:.2f}, "
                f"{row['node_warnings']} node warnings",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"seconds": seconds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
