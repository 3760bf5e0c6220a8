"""What it takes to keep newcomers out of a host: connection slots held by one attacker.

A host keeps 300 connections (py-libp2p's default; `HostConfig.max_connections`). This bench
runs a host in one process (the pool's defaults; loopback exempt from the per-address limits,
as in the simulated swarm, so one process here stands for an attacker with as many addresses as
it likes) and an attacker in another, for `--seconds` per case:

- silent sockets: `--sockets` TCP connections that never send a byte, each opened again once
  the host closes it (no handshake, no identity: the cheapest hold); then the same from one
  address of its own (127.0.0.2) with loopback counted like any address, as a host on the
  internet counts a stranger's (`HostConfig.limit_loopback`);
- idle identities: `--identities` fresh identities, each connecting, asking once, then holding
  its connection;
- busy identities: the same, each asking once a second (under the per-peer rate).

Meanwhile a newcomer (a fresh identity each time) connects and asks once every
`--every` seconds, and so does a member (one identity the host prefers, `Host.prefer`, as the
coordinator prefers its trusted nodes), each on a fresh connection. The table gives how many
got in and how long it took.

    python bench/slot_hog.py                  # 20 s per case
    python bench/slot_hog.py --seconds 10 --identities 330

Prints a table and writes bench/results/slot_hog.json (and .md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests/protocol/helpers"))

from attackers import hold_silent_sockets
from flood import PROTOCOL_ID, Beat, BeatReply, answer, cpu_s
from shardcast_common import HostProcess, machine, save, table

from protocol.errors import SwarmError
from protocol.host import Host, HostConfig
from protocol.identity import Identity

POOL = "benchpoolaaaaaaaaaaaaaaa"
QUIET = {"gossip": False}
STATS = ("served", "connections_over_held", "connections_refused", "connections_evicted")
STATS += ("handshakes_cut",)


async def serve(member: str, limit_loopback: bool) -> None:
    """The host; on each line of stdin it prints its CPU seconds and counters so far."""
    config = HostConfig(limit_loopback=limit_loopback, **QUIET)
    async with Host.open(Identity.generate(), POOL, config=config) as host:
        host.serve(PROTOCOL_ID, answer, Beat, BeatReply)
        host.prefer(member.__eq__)
        print("ADDR", host.addrs[0], flush=True)
        while await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True):
            facts = {k: getattr(host.stats, k) for k in STATS}
            facts["connections"] = len(host.libp2p.get_network().get_connections())
            print(json.dumps({"cpu_s": cpu_s(), **facts}), flush=True)


# ------------------------------------------------------------------ the attacker


async def silent_sockets(addr: str, seconds: float, n: int, source: str | None) -> Counter[str]:
    port = int(addr.split("/tcp/")[1].split("/")[0])
    counts: Counter[str] = Counter()
    with trio.move_on_after(seconds):
        await hold_silent_sockets(port, n, source, counts)
    return counts


async def identities(addr: str, seconds: float, n: int, every_s: float | None) -> Counter[str]:
    """`n` identities that connect and ask once, then hold the connection, asking again every
    `every_s` (never, for None)."""
    counts: Counter[str] = Counter()
    config = HostConfig(dial_attempts=1, **QUIET)

    async def one(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with Host.open(Identity.generate(), POOL, config=config) as host:
            task_status.started()
            while True:
                try:
                    await host.request(addr, PROTOCOL_ID, Beat(n=1), BeatReply, timeout_s=10.0)
                    counts["served"] += 1
                except SwarmError as e:
                    counts[type(e).__name__] += 1
                if every_s is None:
                    await trio.sleep_forever()
                await trio.sleep(every_s)

    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                await nursery.start(one)  # one at a time: each host opens before the next
    return counts


def attack(args: argparse.Namespace) -> None:
    start = cpu_s()
    if args.attack == "silent":
        counts = trio.run(silent_sockets, args.addr, args.seconds, args.sockets, args.source)
    else:
        every_s = 1.0 if args.attack == "busy" else None
        counts = trio.run(identities, args.addr, args.seconds, args.identities, every_s)
    print(json.dumps({"counts": counts, "cpu_s": cpu_s() - start}), flush=True)


# ------------------------------------------------------------------ the bench


async def newcomers(addr: str, seconds: float, every_s: float, member: Identity) -> dict:
    """A fresh stranger and the member, each connecting anew and asking once every `every_s`."""
    config = HostConfig(dial_attempts=1, **QUIET)
    outcome: dict[str, dict] = {}
    peer = addr.rsplit("/p2p/", 1)[1]

    async def arrive(name: str, identity: Identity | None) -> None:
        got, failed = [], Counter()
        end = trio.current_time() + seconds
        while trio.current_time() < end:
            t0 = time.perf_counter()
            async with Host.open(identity or Identity.generate(), POOL, config=config) as host:
                try:
                    await host.request(addr, PROTOCOL_ID, Beat(n=1), BeatReply, timeout_s=10.0)
                    got.append(time.perf_counter() - t0)
                except SwarmError as e:
                    failed[type(e).__name__] += 1
                await host.disconnect(peer)
            await trio.sleep(max(0.0, every_s - (time.perf_counter() - t0)))
        outcome[name] = {
            "in": len(got),
            "tries": len(got) + sum(failed.values()),
            "failed": dict(failed),
            "p50_ms": 1000 * statistics.median(got) if got else None,
        }

    async with trio.open_nursery() as nursery:
        nursery.start_soon(arrive, "stranger", None)
        nursery.start_soon(arrive, "member", member)
    return outcome


# (name, attack, one address of its own with loopback counted)
CASES = [
    ("no attack", None, False),
    ("silent sockets", "silent", False),
    ("silent sockets, one address, counted", "silent", True),
    ("idle identities", "idle", False),
    ("busy identities", "busy", False),
]


def run_case(name: str, kind: str | None, counted: bool, args: argparse.Namespace) -> dict:
    member = Identity.generate()
    serve = [sys.executable, __file__, "--serve", member.peer_id()]
    server = HostProcess(serve + (["--limit-loopback"] if counted else []))
    try:
        before = server.facts()
        attacker = None
        if kind is not None:
            command = [sys.executable, __file__, "--attack", kind, "--addr", server.addr]
            command += ["--seconds", str(args.seconds + args.warmup)]
            command += ["--sockets", str(args.sockets), "--identities", str(args.identities)]
            command += ["--source", "127.0.0.2"] if counted else []
            attacker = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            time.sleep(args.warmup)  # the attacker takes its slots first
        held = server.facts()
        start = time.perf_counter()
        arrivals = trio.run(newcomers, server.addr, args.seconds, args.every, member)
        attacked = json.loads(attacker.communicate(timeout=300)[0]) if attacker else None
        wall = time.perf_counter() - start
        after = server.facts()
    finally:
        server.close()
    return {
        "case": name,
        "wall_s": wall,
        "host_cores": (after["cpu_s"] - before["cpu_s"]) / (wall + (args.warmup if kind else 0)),
        "connections_at_start": held["connections"],
        "host": {k: after[k] for k in STATS},
        "attacker": attacked,
        "arrivals": arrivals,
    }


def row(r: dict) -> list:
    s, m, host = r["arrivals"]["stranger"], r["arrivals"]["member"], r["host"]

    def ms(v: float | None) -> object:
        return round(v) if v is not None else "-"

    return [
        r["case"],
        r["connections_at_start"],
        round(r["host_cores"], 2),
        f"{s['in']} of {s['tries']}",
        ms(s["p50_ms"]),
        f"{m['in']} of {m['tries']}",
        ms(m["p50_ms"]),
        host["connections_evicted"],
        host["handshakes_cut"],
        host["connections_over_held"] + host["connections_refused"],
    ]


HEADERS = [
    "case",
    "host connections when newcomers start",
    "host cores",
    "strangers in",
    "stranger p50 ms",
    "member in",
    "member p50 ms",
    "connections closed for room",
    "handshakes cut",
    "connections refused",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="per case (default 20)")
    p.add_argument("--warmup", type=float, default=15.0, help="attack alone first (default 15)")
    p.add_argument("--every", type=float, default=1.0, help="newcomers' pace, s (default 1)")
    p.add_argument("--sockets", type=int, default=600, help="silent sockets (default 600)")
    p.add_argument("--identities", type=int, default=330, help="hogging identities (330)")
    p.add_argument("--serve", metavar="MEMBER", help=argparse.SUPPRESS)
    p.add_argument("--attack", choices=["silent", "idle", "busy"], help=argparse.SUPPRESS)
    p.add_argument("--addr", help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--limit-loopback", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        trio.run(serve, args.serve, args.limit_loopback)
        return 0
    if args.attack:
        attack(args)
        return 0
    result = {"machine": machine(), "args": vars(args), "cases": []}
    for name, kind, counted in CASES:
        print(f"... {name}", file=sys.stderr, flush=True)
        result["cases"].append(run_case(name, kind, counted, args))
    markdown = table(HEADERS, [row(r) for r in result["cases"]])
    save("slot_hog", result, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
