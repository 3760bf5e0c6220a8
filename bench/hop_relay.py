"""What relaying costs a circuit-relay hop, and what its rate cap buys back.

A coordinator runs a relay hop on its own event loop (`trainer.relays.relay_hop`), so every
byte a circuit forwards is decrypted and re-encrypted in Python beside the pool's requests.
This bench runs a hop in its own process, with a probe task on the hop's event loop that
asks to sleep 10 ms again and again and records how late it wakes (the delay any request
on that loop would see). A member (serving a 16 MiB body over SHARDCAST streams, DCUtR off,
so the circuit is the only way to it) and a fetcher in a second process push `--mb` MiB
through the hop on `--circuits` concurrent streams, once per rate in `--rates`.

    python bench/hop_relay.py                          # rates: uncapped, 16 MB/s (default)
    python bench/hop_relay.py --rates 0,4,16 --mb 96

Prints a table and writes bench/results/hop_relay.json (and .md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardcast_common import REPO, machine, save, table

from protocol.identity import Identity
from shardcast.nat import HopLimits, open_node, p2p_mounts
from shardcast.p2p import p2p_url
from shardcast.server import serve_app

BODY = bytes(range(256)) * 4096 * 16  # 16 MiB
PROBE_S = 0.01
IDLE_S = 2.0
LOOP_KEYS = (
    "late_p50_ms",
    "late_p99_ms",
    "request_idle_p50_ms",
    "request_p50_ms",
    "request_p99_ms",
)


def answering(body: bytes) -> Callable:
    """An ASGI app that answers every request with `body`: a member serving a file (BODY),
    or what a pool's API answers besides the hop's relaying (a few bytes)."""
    headers = [(b"content-length", str(len(body)).encode())]

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


class Asker:
    """A client in a thread of the hop's process, asking the hop loop's own HTTP server for
    a small answer every 10 ms, as nodes ask a coordinator: how long each answer takes is
    what relaying costs the pool's requests."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.times: list[float] = []
        threading.Thread(target=self._ask, daemon=True).start()

    def _ask(self) -> None:
        with httpx.Client(timeout=30) as http:
            while True:
                start = time.perf_counter()
                http.get(self.url)
                self.times.append(time.perf_counter() - start)
                time.sleep(PROBE_S)

    def quantiles_ms(self, since: int) -> list[float]:
        times = self.times[since:]
        if len(times) < 2:
            return [0.0] * 99
        return [1000 * q for q in statistics.quantiles(times, n=100)]


async def serve_hop(rate_mb_s: float) -> None:
    """The hop process: prints its address, then on each stdin line `start` resets its
    counters and on `report` prints CPU seconds, bytes relayed, the loop probe's lateness
    and the spinning thread's speed against its speed before the push."""
    limits = HopLimits(rate_bytes_s=rate_mb_s * 1e6)
    late: list[float] = []

    async def probe() -> None:
        while True:
            before = trio.current_time()
            await trio.sleep(PROBE_S)
            late.append(trio.current_time() - before - PROBE_S)

    async with (
        open_node(Identity.generate(), hop=limits, dcutr=False) as hop,
        trio.open_nursery() as n,
    ):
        n.start_soon(probe)
        asker = Asker(await n.start(serve_app, answering(b"ok"), "127.0.0.1", 0) + "/health")
        idle_cpu = time.process_time()
        await trio.sleep(IDLE_S)
        idle_cpu_share = (time.process_time() - idle_cpu) / IDLE_S
        idle = asker.quantiles_ms(0)
        print(json.dumps({"addr": hop.addrs[0]}), flush=True)
        cpu0, relayed0, asked0 = time.process_time(), 0, 0
        while line := (await trio.to_thread.run_sync(sys.stdin.readline)).strip():
            if line == "start":
                late.clear()
                cpu0, relayed0, asked0 = time.process_time(), hop.relayed_bytes, len(asker.times)
                continue
            asked = asker.quantiles_ms(asked0)
            q = statistics.quantiles(late, n=100) if len(late) > 1 else [0.0] * 99
            report = {
                "cpu_s": time.process_time() - cpu0,
                "relayed_bytes": hop.relayed_bytes - relayed0,
                "late_p50_ms": 1000 * q[49],
                "late_p99_ms": 1000 * q[98],
                "idle_cpu_share": idle_cpu_share,
                "request_idle_p50_ms": idle[49],
                "request_p50_ms": asked[49],
                "request_p99_ms": asked[98],
            }
            print(json.dumps(report), flush=True)
        n.cancel_scope.cancel()


async def push(hop_addr: str, mb: int, circuits: int, hop: subprocess.Popen) -> dict:
    """Fetch `mb` MiB from a member through the hop on `circuits` streams at once."""
    async with (
        open_node(Identity.generate(), dcutr=False) as member,
        open_node(Identity.generate(), dcutr=False) as fetcher,
        trio.open_nursery() as nursery,
    ):
        base = await nursery.start(serve_app, answering(BODY), "127.0.0.1", 0)
        member.serve_gateway(base)
        fetcher.learn(member.peer_id, [await member.reserve(hop_addr)])
        url = f"{p2p_url(member.peer_id)}/body"
        count = max(1, mb * 2**20 // len(BODY))
        todo = iter(range(count))
        got = 0

        async def worker(http: httpx.AsyncClient) -> None:
            nonlocal got
            for _ in todo:
                r = await http.get(url)
                assert r.content == BODY, "the body came back changed"
                got += len(r.content)

        async with httpx.AsyncClient(mounts=p2p_mounts(fetcher), timeout=120) as http:
            await http.get(url)  # the circuit is up before the clock starts
            send(hop, "start")
            start = time.perf_counter()
            async with trio.open_nursery() as workers:
                for _ in range(circuits):
                    workers.start_soon(worker, http)
            wall = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    report = ask(hop, "report")
    mb_relayed = report["relayed_bytes"] / 1e6
    # what the hop's process spent beyond what it spends idle (the asking thread, its server)
    relaying_cpu_s = report["cpu_s"] - report["idle_cpu_share"] * wall
    return {
        "wall_s": wall,
        "payload_mb_s": got / 1e6 / wall,
        "relayed_mb_s": mb_relayed / wall,
        "hop_cpu_share": report["cpu_s"] / wall,
        "relaying_cpu_share": relaying_cpu_s / wall,
        "relaying_cpu_ms_per_mb": 1000 * relaying_cpu_s / max(mb_relayed, 1e-9),
        **{k: report[k] for k in LOOP_KEYS},
        "idle_cpu_share": report["idle_cpu_share"],
    }


def send(hop: subprocess.Popen, line: str) -> None:
    assert hop.stdin is not None
    hop.stdin.write(line + "\n")
    hop.stdin.flush()


def ask(hop: subprocess.Popen, line: str) -> dict:
    send(hop, line)
    assert hop.stdout is not None
    return json.loads(hop.stdout.readline())


def run_rate(rate: float, mb: int, circuits: int) -> dict:
    hop = subprocess.Popen(
        [sys.executable, __file__, "--serve-hop", str(rate)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    try:
        assert hop.stdout is not None
        addr = json.loads(hop.stdout.readline())["addr"]
        return {"rate_mb_s": rate, **trio.run(push, addr, mb, circuits, hop)}
    finally:
        hop.kill()
        hop.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rates", default="0,16", help="hop caps in MB/s, 0 = uncapped (default 0,16)")
    ap.add_argument("--mb", type=int, default=64, help="MiB pushed through the hop per rate")
    ap.add_argument("--circuits", type=int, default=4, help="concurrent streams (default 4)")
    ap.add_argument("--serve-hop", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_hop is not None:
        trio.run(serve_hop, args.serve_hop)
        return
    rows = [run_rate(float(r), args.mb, args.circuits) for r in args.rates.split(",")]
    headers = ["hop cap MB/s", "payload MB/s", "hop CPU share", "of it relaying",
               "relaying CPU ms/MB",
               "loop late p50 ms", "loop late p99 ms", "request idle p50 ms",
               "request p50 ms", "request p99 ms"]  # fmt: skip
    keys = ["rate_mb_s", "payload_mb_s", "hop_cpu_share", "relaying_cpu_share",
            "relaying_cpu_ms_per_mb", *LOOP_KEYS]  # fmt: skip
    cells = [[r[k] if r[k] or k != "rate_mb_s" else "none" for k in keys] for r in rows]
    markdown = table(headers, cells)
    cmd = "python bench/hop_relay.py " + " ".join(sys.argv[1:])
    save("hop_relay", {"machine": machine(), "command": cmd.strip(), "mb": args.mb,
                       "circuits": args.circuits, "rows": rows}, markdown)  # fmt: skip


if __name__ == "__main__":
    main()
