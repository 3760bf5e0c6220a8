"""Benchmark of `protocol/`: envelopes, and request/response over libp2p beside plain TCP.

    python bench/protocol.py [--quick] [--out bench/results/protocol.json]

Measures, in one run:

- envelope `seal` and `EnvelopeVerifier.open` per second (small message, one core);
- request/response round trips per second and request MB/s over libp2p (Noise + yamux) on
  127.0.0.1, for several payload sizes, as `Host.request` does it (answered streams are reused)
  and, for comparison, with a new stream per request (`HostConfig(reuse_streams=False)`);
- the same exchange over a plain trio TCP socket with the same framing and the same envelope
  work on both sides (seal, verify), one persistent connection.

The server runs in a separate OS process, so client and server each have a core. The ratio
libp2p / TCP is the figure: what the libp2p transport costs over the bare socket.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import ClassVar

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `protocol`

from shardcast_common import HostProcess

from protocol.envelope import EnvelopeVerifier, ReplayGuard, Verified, seal
from protocol.framing import encode_frame, read_frame
from protocol.host import Host, HostConfig
from protocol.identity import Identity
from protocol.wire import Message

POOL = "benchpoolaaaaaaaaaaaaaaa"
PROTOCOL_ID = "/swarmrl-bench/echo/1"
MAX_PAYLOAD = 8 * 1024 * 1024
ENVELOPE_LIMIT = MAX_PAYLOAD + 4096


class BenchRequest(Message, tag="bench-request"):
    max_bytes: ClassVar[int] = MAX_PAYLOAD + 1024
    data: bytes


class BenchReply(Message, tag="bench-reply"):
    max_bytes: ClassVar[int] = 1024
    size: int


class Small(Message, tag="bench-small"):
    lease: int
    version: int
    note: str


def bench_config(reuse_streams: bool = True) -> HostConfig:
    # No rate limit worth the name: the benchmark is the only peer and asks as fast as it can.
    return HostConfig(requests_per_s=1e9, burst=1e9, gossip=False, reuse_streams=reuse_streams)


def verifier() -> EnvelopeVerifier:
    return EnvelopeVerifier(POOL, ReplayGuard(max_entries=10_000_000))


# ------------------------------------------------------------------ servers (child process)


async def answer(request: Verified[BenchRequest]) -> BenchReply:
    return BenchReply(size=len(request.message.data))


async def serve_libp2p(identity: Identity) -> None:
    async with Host.open(identity, POOL, config=bench_config(), verifier=verifier()) as host:
        host.serve(PROTOCOL_ID, answer, BenchRequest, BenchReply)
        print("ADDR", host.addrs[0], flush=True)
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


async def serve_tcp(identity: Identity) -> None:
    check = verifier()

    async def connection(stream: trio.SocketStream) -> None:
        async with stream:
            while True:
                try:
                    data = await read_frame(stream.receive_some, ENVELOPE_LIMIT)
                except Exception:
                    return  # the client hung up
                request = check.open(data, BenchRequest)
                reply = await answer(request)
                await stream.send_all(encode_frame(seal(identity, POOL, reply)))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    print("ADDR", f"127.0.0.1:{port}", flush=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, connection, listeners)
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ client side


def server(kind: str, identity: Identity) -> HostProcess:
    """A server child process of `kind` (it exits when its stdin closes)."""
    return HostProcess([sys.executable, __file__, "--serve", kind, "--seed", identity.seed.hex()])


async def timed(run_one, seconds: float, min_count: int) -> tuple[int, float]:
    await run_one()  # warm-up: connection, first stream, caches
    count, start = 0, time.perf_counter()
    while count < min_count or time.perf_counter() - start < seconds:
        await run_one()
        count += 1
    return count, time.perf_counter() - start


async def bench_libp2p(
    addr: str, sizes: list[int], seconds: float, reuse_streams: bool
) -> dict[int, dict]:
    out = {}
    config = bench_config(reuse_streams)
    async with Host.open(Identity.generate(), POOL, config=config, verifier=verifier()) as h:
        for size in sizes:
            payload = os.urandom(size)

            async def one(payload: bytes = payload) -> None:
                reply = await h.request(addr, PROTOCOL_ID, BenchRequest(data=payload), BenchReply)
                assert reply.message.size == len(payload)

            count, elapsed = await timed(one, seconds, 5)
            out[size] = stats(count, elapsed, size)
    return out


async def bench_tcp(addr: str, server_key: bytes, sizes: list[int], seconds: float) -> dict:
    out = {}
    me, check = Identity.generate(), verifier()
    host, port = addr.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        for size in sizes:
            payload = os.urandom(size)

            async def one(payload: bytes = payload) -> None:
                await stream.send_all(encode_frame(seal(me, POOL, BenchRequest(data=payload))))
                data = await read_frame(stream.receive_some, 64 * 1024)
                assert check.open(data, BenchReply, signer=server_key).message.size == len(payload)

            count, elapsed = await timed(one, seconds, 5)
            out[size] = stats(count, elapsed, size)
    return out


def stats(count: int, elapsed: float, size: int) -> dict:
    return {
        "round_trips": count,
        "seconds": round(elapsed, 3),
        "rt_per_s": round(count / elapsed, 1),
        "mb_per_s": round(count * size / elapsed / 1e6, 2),
        "ms_per_rt": round(1000 * elapsed / count, 3),
    }


def bench_envelopes(seconds: float) -> dict:
    me = Identity.generate()
    message = Small(lease=12345, version=7, note="x" * 64)
    count, start = 0, time.perf_counter()
    sealed = []
    while time.perf_counter() - start < seconds:
        sealed.append(seal(me, POOL, message))
        count += 1
    seal_rate = count / (time.perf_counter() - start)
    check = verifier()
    start = time.perf_counter()
    for data in sealed:
        check.open(data, Small, signer=me.public_key)
    verify_rate = len(sealed) / (time.perf_counter() - start)
    return {
        "envelope_bytes": len(sealed[0]),
        "seal_per_s": round(seal_rate),
        "verify_per_s": round(verify_rate),
    }


def load_average() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def human(size: int) -> str:
    return f"{size // (1024 * 1024)} MiB" if size >= 1024 * 1024 else f"{size // 1024} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (~15 s)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "protocol.json"))
    parser.add_argument("--serve", choices=["libp2p", "tcp"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve:
        identity = Identity(bytes.fromhex(args.seed))
        trio.run(serve_libp2p if args.serve == "libp2p" else serve_tcp, identity)
        return

    seconds = 1.0 if args.quick else 3.0
    sizes = [1024, 64 * 1024, 1024 * 1024] + ([] if args.quick else [4 * 1024 * 1024])
    load_before = load_average()
    envelopes = bench_envelopes(seconds)

    server_id = Identity.generate()
    libp2p_server = server("libp2p", server_id)
    try:
        libp2p = trio.run(bench_libp2p, libp2p_server.addr, sizes, seconds, True)
        fresh = trio.run(bench_libp2p, libp2p_server.addr, sizes, seconds, False)
    finally:
        libp2p_server.close()
    tcp_server = server("tcp", server_id)
    try:
        tcp = trio.run(bench_tcp, tcp_server.addr, server_id.public_key, sizes, seconds)
    finally:
        tcp_server.close()

    rows = []
    for size in sizes:
        ratio = libp2p[size]["rt_per_s"] / tcp[size]["rt_per_s"]
        rows.append(
            {
                "payload_bytes": size,
                "libp2p": libp2p[size],
                "libp2p_stream_per_request": fresh[size],
                "tcp": tcp[size],
                "libp2p_over_tcp": round(ratio, 3),
            }
        )
    result = {
        "command": " ".join(["python", "bench/protocol.py", *sys.argv[1:]]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "uptime_before": load_before,
        "uptime_after": load_average(),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "libp2p": version("libp2p"),
        },
        "quick": args.quick,
        "envelope": envelopes,
        "round_trips": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"envelopes ({envelopes['envelope_bytes']} B): "
        f"{envelopes['seal_per_s']:,} seal/s, {envelopes['verify_per_s']:,} verify/s"
    )
    print()
    print(
        "| payload | libp2p RT/s | libp2p MB/s | TCP RT/s | TCP MB/s | libp2p / TCP "
        "| libp2p, stream per request: RT/s |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        a, b, f = row["libp2p"], row["tcp"], row["libp2p_stream_per_request"]
        print(
            f"| {human(row['payload_bytes'])} | {a['rt_per_s']:,.0f} | {a['mb_per_s']:,.1f} | "
            f"{b['rt_per_s']:,.0f} | {b['mb_per_s']:,.1f} | {row['libp2p_over_tcp']:.2f} "
            f"| {f['rt_per_s']:,.0f} |"
        )
    print()
    print(f"load: {load_before}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
