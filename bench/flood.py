"""What one flooding machine costs a host: requests far above the rate limit, or new
connections far above the connection rate, with and without the host's defences.

A host's rate limiter refuses a peer over `requests_per_s`, but only once the peer has opened a
stream, negotiated the protocol and sent a frame: most of what serving costs. A connection costs
more still (a Noise handshake, a muxer, identify) before any rate limit applies. This bench runs
a host (the pool's defaults: 20 requests a second, bursts of 40) in one process, an attacker in
another, and an honest peer beside them asking `--honest-rate` times a second (connected before
the attack, as a pool's nodes are), for `--seconds` per case:

- request flood: bursts of `--burst` requests every second on one connection, as
  `examples/byzantine.py flood` sends them; with the cutoff off, then on
  (`HostConfig.cutoff_strikes`, `ratelimit.Cutoff`: a peer that keeps collecting refusals has
  its new streams reset before negotiation for `cutoff_s`);
- connection churn: `--churners` identities each connecting, asking once and hanging up, over
  and over; with the per-address connection rate off, then on (`HostConfig.connections_per_ip_s`:
  past it a connection is closed before its handshake; loopback counted here).

    python bench/flood.py                    # 20 s per case
    python bench/flood.py --seconds 10 --burst 200

Prints a table and writes bench/results/flood.json (and .md).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import ClassVar

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardcast_common import HostProcess, machine, save, table

from protocol.envelope import Verified
from protocol.errors import RemoteError, SwarmError
from protocol.host import Host, HostConfig
from protocol.identity import Identity
from protocol.wire import Message

POOL = "benchpoolaaaaaaaaaaaaaaa"
PROTOCOL_ID = "/swarmrl-bench/beat/1"


class Beat(Message, tag="bench-beat"):
    max_bytes: ClassVar[int] = 256
    n: int


class BeatReply(Message, tag="bench-beat-reply"):
    max_bytes: ClassVar[int] = 256
    n: int


async def answer(request: Verified[Beat]) -> BeatReply:
    return BeatReply(n=request.message.n)


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------ child processes

OFF = 1e12
"""A limit nobody reaches: the defence off."""
STATS = ("served", "refused", "cutoffs", "streams_cut", "connections_refused")


async def serve(config: HostConfig) -> None:
    """The host; on each line of stdin it prints its CPU seconds and counters so far."""
    async with Host.open(Identity.generate(), POOL, config=config) as host:
        host.serve(PROTOCOL_ID, answer, Beat, BeatReply)
        print("ADDR", host.addrs[0], flush=True)
        while await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True):
            facts = {k: getattr(host.stats, k) for k in STATS}
            print(json.dumps({"cpu_s": cpu_s(), **facts}), flush=True)


async def ask(host: Host, addr: str, counts: Counter[str]) -> None:
    """One request, its outcome counted: served, a refusal's code, or a transport error."""
    try:
        await host.request(addr, PROTOCOL_ID, Beat(n=1), BeatReply, timeout_s=10.0)
        counts["served"] += 1
    except RemoteError as e:
        counts[e.code] += 1
    except SwarmError as e:
        counts[type(e).__name__] += 1


async def flood(addr: str, seconds: float, burst: int) -> Counter[str]:
    """Bursts of `burst` concurrent requests, the next a second after the last one ended."""
    counts: Counter[str] = Counter()
    async with Host.open(Identity.generate(), POOL, config=HostConfig(gossip=False)) as host:
        end = trio.current_time() + seconds
        while trio.current_time() < end:
            async with trio.open_nursery() as nursery:
                for _ in range(burst):
                    nursery.start_soon(ask, host, addr, counts)
            await trio.sleep(1.0)
    return counts


async def churn(addr: str, seconds: float, churners: int) -> Counter[str]:
    """`churners` identities, each connecting, asking once and hanging up until the end."""
    counts: Counter[str] = Counter()
    config = HostConfig(gossip=False, dial_attempts=1)
    end = trio.current_time() + seconds
    peer = addr.rsplit("/p2p/", 1)[1]

    async def churner() -> None:
        async with Host.open(Identity.generate(), POOL, config=config) as host:
            while trio.current_time() < end:
                await ask(host, addr, counts)
                await host.disconnect(peer)

    async with trio.open_nursery() as nursery:
        for _ in range(churners):
            nursery.start_soon(churner)
    return counts


def attack(args: argparse.Namespace) -> None:
    start = cpu_s()
    if args.attack == "requests":
        counts = trio.run(flood, args.addr, args.seconds, args.burst)
    else:
        counts = trio.run(churn, args.addr, args.seconds, args.churners)
    print(json.dumps({"counts": counts, "cpu_s": cpu_s() - start}), flush=True)


# ------------------------------------------------------------------ the bench


async def honest(addr: str, seconds: float, rate: float) -> dict:
    """One request every 1/rate s; the latency of each, and what failed."""
    latencies, failed = [], Counter()
    async with Host.open(Identity.generate(), POOL, config=HostConfig(gossip=False)) as host:
        await host.request(addr, PROTOCOL_ID, Beat(n=0), BeatReply)  # connected before timing
        end = trio.current_time() + seconds
        while trio.current_time() < end:
            t0 = time.perf_counter()
            try:
                await host.request(addr, PROTOCOL_ID, Beat(n=1), BeatReply, timeout_s=10.0)
                latencies.append(time.perf_counter() - t0)
            except SwarmError as e:
                failed[getattr(e, "code", type(e).__name__)] += 1
            await trio.sleep(max(0.0, 1.0 / rate - (time.perf_counter() - t0)))
    latencies.sort()
    return {
        "answered": len(latencies),
        "failed": dict(failed),
        "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
    }


LOOPBACK = {"limit_loopback": True}  # every process here is on 127.0.0.1

# (name, host config, attack): each defence off, then on, against the attack it answers.
CASES = [
    ("no attack", {}, None),
    ("request flood, cutoff off", {"cutoff_strikes": OFF}, "requests"),
    ("request flood, cutoff on", {}, "requests"),
    (
        "connection churn, rate off",
        {"connections_per_ip_s": OFF, "limit_loopback": True},
        "connections",
    ),
    ("connection churn, rate on", {"limit_loopback": True}, "connections"),
]


def run_case(name: str, config: dict, kind: str | None, args: argparse.Namespace) -> dict:
    serve = json.dumps({"gossip": False, **config})
    server = HostProcess([sys.executable, __file__, "--serve", serve])
    try:
        before = server.facts()
        attacker = None
        if kind is not None:
            command = [sys.executable, __file__, "--attack", kind, "--addr", server.addr]
            command += ["--seconds", str(args.seconds), "--burst", str(args.burst)]
            command += ["--churners", str(args.churners)]
            attacker = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        start = time.perf_counter()
        polite = trio.run(honest, server.addr, args.seconds, args.honest_rate)
        attacked = json.loads(attacker.communicate(timeout=120)[0]) if attacker else None
        wall = time.perf_counter() - start
        after = server.facts()
    finally:
        server.close()
    host_cpu = after["cpu_s"] - before["cpu_s"]
    return {
        "case": name,
        "wall_s": wall,
        "host_cpu_s": host_cpu,
        "host_cores": host_cpu / wall,
        "host": {k: after[k] for k in STATS},
        "attacker": attacked,
        "honest": polite,
    }


def row(r: dict) -> list:
    a, h, host = r["attacker"] or {}, r["honest"], r["host"]

    def ms(v: float | None) -> object:
        return round(v, 1) if v is not None else "-"

    return [
        r["case"],
        round(r["host_cores"], 3),
        round(r["host_cpu_s"], 2),
        round(a["cpu_s"], 2) if a else "-",
        sum(a["counts"].values()) if a else 0,
        a["counts"].get("served", 0) if a else 0,
        host["served"],
        sum(host["refused"].values()),
        host["streams_cut"],
        host["connections_refused"],
        ms(h["p50_ms"]),
        ms(h["p95_ms"]),
        sum(h["failed"].values()),
    ]


HEADERS = [
    "case",
    "host cores",
    "host CPU s",
    "attacker CPU s",
    "attack requests",
    "attack served",
    "host served",
    "refused",
    "streams cut",
    "connections refused",
    "honest p50 ms",
    "honest p95 ms",
    "honest failed",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="per case (default 20)")
    p.add_argument("--burst", type=int, default=100, help="flood requests a second (default 100)")
    p.add_argument("--churners", type=int, default=8, help="reconnecting identities (default 8)")
    p.add_argument("--honest-rate", type=float, default=5.0, help="honest requests a second")
    p.add_argument("--serve", metavar="CONFIG", help=argparse.SUPPRESS)
    p.add_argument("--attack", choices=["requests", "connections"], help=argparse.SUPPRESS)
    p.add_argument("--addr", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        trio.run(serve, HostConfig(**json.loads(args.serve)))
        return 0
    if args.attack:
        attack(args)
        return 0
    results = [run_case(name, config, kind, args) for name, config, kind in CASES]
    markdown = (
        f"flood: {args.seconds:g} s per case; request floods in bursts of {args.burst} a second, "
        f"connection churn by {args.churners} identities; an honest peer at "
        f"{args.honest_rate:g}/s\n\n" + table(HEADERS, [row(r) for r in results])
    )
    save("flood", {"machine": machine(), "args": vars(args), "cases": results}, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
