"""`python -m shardcast.seed`: one swarm member as a process (tests, benchmarks, operators).

It is a `Relay` with an identity: it mirrors versions from its upstreams and its peers,
re-serves them (upload capped by `--rate-mb`), and prints one JSON line when listening
(`{"role": "seed", "url": ...}`) and one per version it holds complete and verified
(`{"version", "done_at", "bytes_by_source", "bad_sources"}`), until killed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import trio

from protocol.identity import Identity
from protocol.logs import logging_flags, setup_logging
from shardcast.relay import Relay

POLL = 0.05  # seconds between looks for newly completed versions
WILDCARDS = {"0.0.0.0", "::", ""}
"""Listening addresses that name no one address: requests then leave from the system's
choice. A member listening on one address sends from it too, so that its peers and
upstreams count it as the client it is (members on 127.0.0.2, .3, ... of one machine)."""


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


async def _report(relay: Relay) -> None:
    reported: set[int] = set()
    while True:
        for v, sv in list(relay.store.versions.items()):
            if sv.complete and v not in reported:
                reported.add(v)
                by_source = {s.url: s.bytes for s in relay.picker.stats.values() if s.bytes}
                bad = sorted({url for url, *_ in relay.bad_upstreams})
                _emit(
                    {
                        "version": v,
                        "done_at": time.time(),
                        "bytes_by_source": by_source,
                        "bad_sources": bad,
                    }
                )
        await trio.sleep(POLL)


async def _main(args: argparse.Namespace) -> None:
    identity = Identity(bytes.fromhex(args.seed_hex)) if args.seed_hex else Identity.generate()
    relay = Relay(
        args.upstream,
        args.root,
        public_key=bytes.fromhex(args.public_key),
        pool_id=args.pool_id,
        keep=args.keep,
        rate=args.rate_mb * 1e6 if args.rate_mb else None,
        identity=identity,
        max_peers=args.max_peers,
        seed_parallel=args.seed_parallel,
        source_address=args.host if args.host not in WILDCARDS else None,
    )
    async with trio.open_nursery() as nursery:
        url = await nursery.start(relay.run, args.host, args.port)
        _emit({"role": "seed", "url": url, "public_key": identity.public_key.hex()})
        nursery.start_soon(_report, relay)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m shardcast.seed",
        description=__doc__,
        parents=[logging_flags("shardcast.seed")],
    )
    ap.add_argument("--upstream", action="append", required=True)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--pool-id", required=True)
    ap.add_argument("--public-key", required=True, help="the coordinator's key, hex")
    ap.add_argument(
        "--host", default="127.0.0.1", help="address to listen on, and to send requests from"
    )
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--keep", type=int, default=4)
    ap.add_argument("--rate-mb", type=float, default=None, help="upload cap, MB/s")
    ap.add_argument("--max-peers", type=int, default=8)
    ap.add_argument("--seed-parallel", type=int, default=2)
    ap.add_argument("--seed-hex", default=None, help="identity seed (32 bytes hex)")
    args = ap.parse_args(argv)
    setup_logging(args, default="warning")
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_main, args)


if __name__ == "__main__":
    main()
