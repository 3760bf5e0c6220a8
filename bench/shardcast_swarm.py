"""Swarm benchmark: N re-serving nodes against the relay tree, every upload capped at U.

Two runs, each on a fresh origin capped at U, each its own set of processes on loopback:

  swarm: origin -> N swarm members (`python -m shardcast.seed`, upload capped at U), which
         learn each other by gossip and trade shards rarest-first
  tree:  origin -> R relays (capped at U) -> N clients (`shardcast fetch`, no upload)

A run's time is from `shardcast publish` returning to the last node holding the version,
every shard checked against the signed manifest (and, after the run, every node's payload
files compared with the origin's by BLAKE3). Bounds:

  swarm: max(S/U, N*S/((N+1)*U))    the origin must send S once; N*S must be uploaded
  tree:  N*S/(R*U) + one unit (a piece; a shard without pieces) crossing the origin at U/R

    python bench/shardcast_swarm.py                      # S=256 MiB, U=50 MB/s, N=8 and 32
    python bench/shardcast_swarm.py --quick --json F     # S=32 MiB, U=10 MB/s, N=8

16 MiB shards, and pieces sized as `shardcast publish` sizes them (1 MiB, larger for
versions over 64 MiB: 4 MiB at 256 MiB), unless --shard-mb / --piece-kb say otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import blake3
from shardcast_broadcast import make_checkpoint, run_clients
from shardcast_common import REPO, Proc, machine, make_pool, run_cli, save, table

from protocol import poolspec
from shardcast.manifest import AUTO, piece_size_for


class Seed:
    """A `python -m shardcast.seed` process; stdout lines are collected."""

    def __init__(self, *args: str, log: Path) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "shardcast.seed", *args],
            stdout=subprocess.PIPE,
            stderr=open(log, "w"),  # noqa: SIM115 - lives as long as the process
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.lines: list[dict] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(json.loads(line))

    def wait_lines(self, n: int, timeout: float) -> dict:
        deadline = time.time() + timeout
        while len(self.lines) < n:
            if time.time() > deadline or self.popen.poll() is not None:
                raise RuntimeError(f"{self.popen.args} gave {self.lines}")
            time.sleep(0.02)
        return self.lines[n - 1]

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): blake3.blake3(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def _origin(work: Path, tag: str, key: Path, pool: Path, rate_mb: float) -> tuple[Proc, str]:
    o = Proc(
        "origin", "--root", str(work / f"{tag}-origin"), "--key", str(key), "--pool", str(pool),
        "--port", "0", "--rate-mb", str(rate_mb), log=work / f"{tag}-origin.log",
    )  # fmt: skip
    return o, o.first_json()["url"]


def _publish(work: Path, tag: str, ck: Path, key: Path, pool: Path, args) -> None:
    run_cli(
        "publish", str(ck), "--root", str(work / f"{tag}-origin"), "--key", str(key),
        "--pool", str(pool), "--version", "1", "--full", "--shard-mb", str(args.shard_mb),
        "--piece-kb", str(args.piece_kb),
    )  # fmt: skip


def run_swarm(work: Path, ck: Path, key: Path, pool: Path, pid: str, n: int, args) -> dict:
    tag = f"swarm{n}"
    procs: list = []
    try:
        origin, url = _origin(work, tag, key, pool, args.rate_mb)
        procs.append(origin)
        public = poolspec.load(pool).coordinator.public_key
        seeds = []
        for i in range(n):
            s = Seed(
                "--upstream", url, "--root", str(work / f"{tag}-n{i}"), "--pool-id", pid,
                "--public-key", public, "--rate-mb", str(args.rate_mb), "--keep", "1",
                # its own address, as on its own machine: one client to the origin's caps
                "--host", f"127.0.{(i + 2) // 256}.{(i + 2) % 256}", "--log-level", args.log_level,
                log=work / f"{tag}-n{i}.log",
            )  # fmt: skip
            procs.append(s)
            seeds.append(s)
        for s in seeds:
            s.wait_lines(1, 120)
        time.sleep(3.0)  # gossip: every node hears of the others before the version exists
        _publish(work, tag, ck, key, pool, args)
        t0 = time.time()
        done = [s.wait_lines(2, 900) for s in seeds]
        last = max(d["done_at"] for d in done) - t0
        want = _hashes(work / f"{tag}-origin" / "v1" / "payload")
        for i in range(n):
            if _hashes(work / f"{tag}-n{i}" / "v1" / "payload") != want:
                raise RuntimeError(f"node {i} holds different bytes")
        from_origin = sum(d["bytes_by_source"].get(url, 0) for d in done)
        return {
            "nodes": n,
            "last_client_s": last,
            "published_at": t0,
            "node_done_s": sorted(round(d["done_at"] - t0, 3) for d in done),
            "origin_bytes": from_origin,
            "nodes_ok": n,
        }
    finally:
        for p in procs:
            p.kill()


def run_tree(work: Path, ck: Path, key: Path, pool: Path, n: int, args) -> float:
    tag = f"tree{n}"
    procs: list = []
    try:
        origin, url = _origin(work, tag, key, pool, args.rate_mb)
        procs.append(origin)
        relays = []
        for i in range(args.relays):
            r = Proc(
                "relay", "--root", str(work / f"{tag}-r{i}"), "--pool", str(pool),
                "--upstream", url, "--port", "0", "--rate-mb", str(args.rate_mb),
                log=work / f"{tag}-r{i}.log",
            )  # fmt: skip
            procs.append(r)
            relays.append(r.first_json()["url"])
        last, _ = run_clients(
            work,
            pool,
            relays,
            n,
            -1,
            tag,
            lambda: _publish(work, tag, ck, key, pool, args),
        )
        return last
    finally:
        for p in procs:
            p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="S=32 MiB, U=10 MB/s, N=8")
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--size-mb", type=float)
    ap.add_argument("--rate-mb", type=float)
    ap.add_argument("--nodes", type=int, action="append")
    ap.add_argument("--relays", type=int, default=2)
    ap.add_argument("--shard-mb", type=float, default=16.0, help="shard size, MiB")
    ap.add_argument(
        "--piece-kb", default=AUTO, help="piece size, KiB (0: none); default auto, as publish"
    )
    ap.add_argument("--workdir", type=Path, help="run in a new folder here, kept afterwards")
    ap.add_argument("--log-level", default="warning", help="swarm members' log level")
    ap.add_argument("--skip-tree", action="store_true", help="measure the swarm only")
    args = ap.parse_args()
    size = int((args.size_mb or (32 if args.quick else 256)) * 2**20)
    args.rate_mb = args.rate_mb or (10.0 if args.quick else 50.0)
    nodes = args.nodes or ([8] if args.quick else [8, 32])
    rate = args.rate_mb * 1e6
    started = machine()
    work = Path(tempfile.mkdtemp(prefix="shardcast-swarm-", dir=args.workdir))
    rows, runs = [], []
    try:
        key, pool, pid = make_pool(work)
        ck = work / "checkpoint"
        make_checkpoint(ck, size)
        total = sum(p.stat().st_size for p in ck.iterdir())
        shard = int(args.shard_mb * 2**20)
        piece_bytes = (
            piece_size_for(total, shard) if args.piece_kb == AUTO else int(args.piece_kb) * 1024
        )
        for n in nodes:
            swarm = run_swarm(work, ck, key, pool, pid, n, args)
            tree_s = float("nan") if args.skip_tree else run_tree(work, ck, key, pool, n, args)
            swarm_bound = max(total / rate, n * total / ((n + 1) * rate))
            unit = piece_bytes or args.shard_mb * 2**20
            tree_bound = n * total / (args.relays * rate) + unit / (rate / args.relays)
            run = {
                **swarm,
                "swarm_bound_s": swarm_bound,
                "swarm_over_bound": swarm["last_client_s"] / swarm_bound,
                "origin_sent_over_s": swarm["origin_bytes"] / total,
                "tree_last_client_s": tree_s,
                "tree_bound_s": tree_bound,
            }
            runs.append(run)
            for name, t, b in (
                ("swarm", swarm["last_client_s"], swarm_bound),
                (f"tree (R={args.relays})", tree_s, tree_bound),
            ):
                rows.append([name, n, total // 2**20, args.rate_mb, t, b, t / b])
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work} (stores and logs)")
    head = ["run", "N", "S (MiB)", "U (MB/s)", "last node (s)", "bound (s)", "ratio to bound"]
    md = table(head, rows)
    first = runs[0]
    result = {
        "machine": started,
        "bytes": total,
        "rate_bytes_per_s": rate,
        "shard_bytes": int(args.shard_mb * 2**20),
        "piece_bytes": piece_bytes,
        "last_client_s": first["last_client_s"],
        "swarm_bound_s": first["swarm_bound_s"],
        "tree_bound_s": first["tree_bound_s"],
        "runs": runs,
    }
    save("shardcast_swarm" + ("_quick" if args.quick else ""), result, md)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
