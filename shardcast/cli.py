"""`shardcast origin | publish | relay | fetch`: the command line over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio

from protocol import poolspec
from protocol.errors import SwarmError
from protocol.identity import Identity
from protocol.logs import logging_flags, setup_logging
from protocol.rlimit import raise_open_files_limit
from shardcast.manifest import AUTO, DEFAULT_SHARD_SIZE
from shardcast.store import DEFAULT_KEEP

# Roles import their stacks lazily: `fetch` needs no web framework, and start-up time counts
# for short-lived commands.


def _pool_args(p: argparse.ArgumentParser, need_key: bool) -> None:
    g = p.add_argument_group("pool (give --pool, or --pool-id with the coordinator's key)")
    g.add_argument("--pool", type=Path, help="pool spec TOML: gives the pool id and the key")
    g.add_argument("--pool-id", help="pool id the manifests must name")
    if need_key:
        g.add_argument("--key", type=Path, required=True, help="coordinator key file (signs)")
    else:
        g.add_argument("--public-key", help="coordinator public key, hex (verifies)")


def _server_args(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=port, help=f"port (default {port}; 0: any)")
    p.add_argument("--rate-mb", type=_non_negative, help="cap this server's upload at MB/s (1e6 B)")


def _p2p_args(p: argparse.ArgumentParser, member: bool) -> None:
    g = p.add_argument_group("libp2p (members behind NAT; see docs/shardcast.md)")
    g.add_argument(
        "--p2p-peer",
        action="append",
        default=[],
        help="address of a p2p://peer/<id> source (a multiaddr ending in /p2p/<id>, "
        "often a relay's /p2p-circuit one)",
    )
    g.add_argument("--p2p-listen", help="libp2p listen multiaddr (default: any port)")
    if member:
        g.add_argument(
            "--p2p-relay",
            action="append",
            default=[],
            help="relay hop (repeatable): checks whether this node is reachable (AutoNAT), "
            "and if not, reserves a slot on each and serves through it",
        )


def _pool(args: argparse.Namespace, identity: Identity | None = None) -> tuple[str, bytes]:
    """(pool id, coordinator public key) from the arguments."""
    if args.pool is not None:
        spec = poolspec.load(args.pool)
        pid, key = poolspec.pool_id(spec), bytes.fromhex(spec.coordinator.public_key)
    else:
        if not args.pool_id:
            raise SwarmError("give --pool FILE or --pool-id ID")
        pid = args.pool_id
        if identity is not None:
            key = identity.public_key
        elif getattr(args, "public_key", None):
            key = bytes.fromhex(args.public_key)
        else:
            raise SwarmError("give --public-key HEX (the coordinator's) or --pool FILE")
    if identity is not None and identity.public_key != key:
        raise SwarmError("--key is not the coordinator key named by the pool spec")
    return pid, key


def _rate(args: argparse.Namespace) -> float | None:
    return args.rate_mb * 1e6 if args.rate_mb else None


def _announce(**fields: object) -> None:
    # One JSON line on stdout: scripts and tests read the bound URL from it.
    print(json.dumps(fields), flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardcast",
        description="Signed, sharded checkpoint broadcast over HTTP.",
        parents=[logging_flags("shardcast")],
    )
    # `publish` and `fetch` have their own --version (a checkpoint's): `shardcast --version`.
    flags = logging_flags("shardcast", with_version=False)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("origin", help="serve a store of published versions", parents=[flags])
    p.add_argument("--root", type=Path, required=True, help="store folder")
    _pool_args(p, need_key=True)
    _server_args(p, 8600)
    p.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="versions kept (>= staleness+2)")

    p = sub.add_parser(
        "publish", help="publish a checkpoint folder as a new version", parents=[flags]
    )
    p.add_argument("folder", type=Path)
    p.add_argument("--root", type=Path, required=True, help="the origin's store folder")
    p.add_argument("--version", type=int, required=True, help="the training step")
    _pool_args(p, need_key=True)
    p.add_argument("--keep", type=int, default=DEFAULT_KEEP)
    p.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_SIZE / 2**20)
    p.add_argument(
        "--piece-kb",
        dest="piece_size",
        type=_piece_size,
        default=AUTO,
        help="piece size (unit of transfer), KiB; 0: none (shards are the unit); "
        "auto (default): 1 MiB, larger for versions over 64 MiB",
    )
    p.add_argument("--full", action="store_true", help="publish in full, not as a delta")
    p.add_argument("--full-every", type=int, default=10, help="a full version every N")

    p = sub.add_parser(
        "relay", help="mirror upstreams and re-serve their versions", parents=[flags]
    )
    p.add_argument("--upstream", action="append", required=True, help="origin or relay URL")
    p.add_argument("--root", type=Path, required=True, help="store folder")
    _pool_args(p, need_key=False)
    _server_args(p, 8601)
    p.add_argument("--keep", type=int, default=DEFAULT_KEEP)
    _p2p_args(p, member=True)

    p = sub.add_parser("hop", help="relay libp2p circuits for members behind NAT", parents=[flags])
    p.add_argument("--listen", default="/ip4/0.0.0.0/tcp/4601", help="libp2p multiaddr")
    p.add_argument("--announce", action="append", help="address to print instead (public)")
    p.add_argument(
        "--rate-mb",
        type=_non_negative,
        default=4.0,
        help="MB/s forwarded, all circuits together; 0 for no cap (default 4)",
    )

    p = sub.add_parser("fetch", help="fetch a version into a folder", parents=[flags])
    p.add_argument("--source", action="append", required=True, help="origin or relay URL")
    p.add_argument("--dest", type=Path, required=True, help="folder holding v{N}/ folders")
    p.add_argument("--version", default="latest", help="a version number, or latest")
    _pool_args(p, need_key=False)
    p.add_argument("--keep", type=int, default=3, help="complete versions to keep")
    p.add_argument("--parallel", type=int, default=8, help="shards in flight")
    p.add_argument("--attempts", type=int, default=8, help="tries per shard")
    p.add_argument("--read-timeout", type=float, default=60.0)
    p.add_argument(
        "--wait", type=float, default=0.0, help="with latest: wait up to S s for a version"
    )
    p.add_argument("--after", type=int, default=-1, help="with --wait: newer than this one")
    p.add_argument("--follow", action="store_true", help="keep fetching each new version")
    _p2p_args(p, member=False)
    return parser


async def _origin(args: argparse.Namespace) -> None:
    from shardcast.origin import Origin

    identity = Identity.load(args.key)
    pid, _ = _pool(args, identity)
    origin = Origin(args.root, identity, pid, keep=args.keep, rate=_rate(args))
    async with trio.open_nursery() as nursery:
        url = await nursery.start(origin.serve, args.host, args.port)
        nursery.start_soon(origin.follow_disk)
        _announce(role="origin", url=url, latest=origin.store.latest())


async def _publish(args: argparse.Namespace) -> None:
    from shardcast.origin import Origin

    identity = Identity.load(args.key)
    pid, _ = _pool(args, identity)
    origin = Origin(
        args.root,
        identity,
        pid,
        keep=args.keep,
        shard_size=int(args.shard_mb * 2**20),
        piece_size=args.piece_size,
        full_every=args.full_every,
    )
    m = await origin.publish(args.folder, args.version, delta=not args.full)
    _announce(
        version=m.version,
        base=m.base,
        files=len(m.files),
        total_bytes=m.total_bytes,
        payload_bytes=m.payload_bytes,
    )


async def _relay(args: argparse.Namespace) -> None:
    from shardcast.nat import open_cli_node
    from shardcast.relay import Relay

    pid, key = _pool(args)
    async with open_cli_node(args, args.p2p_relay) as (node, mounts):
        relay = Relay(
            args.upstream,
            args.root,
            public_key=key,
            pool_id=pid,
            keep=args.keep,
            rate=_rate(args),
            mounts=mounts,
        )
        async with trio.open_nursery() as nursery:
            url = await nursery.start(relay.run, args.host, args.port)
            if node is None:
                _announce(role="relay", url=url)
                return
            reach, addrs = await node.serve_member(url, args.p2p_relay)
            _announce(
                role="relay",
                url=url,
                peer_id=node.peer_id,
                reachability=reach.value,
                p2p_addrs=addrs,
            )
            await trio.sleep_forever()


def _piece_size(text: str) -> int | str | None:
    """`--piece-kb` as `Origin` takes it: AUTO, bytes, or None for 0 (no pieces)."""
    if text == AUTO:
        return text
    try:
        return int(text) * 1024 or None
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of KiB or auto") from None


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


async def _hop(args: argparse.Namespace) -> None:
    from shardcast.nat import HopLimits, open_node

    hop = HopLimits(rate_bytes_s=args.rate_mb * 1e6)
    async with open_node(Identity.generate(), [args.listen], hop=hop) as node:
        addrs = [f"{a}/p2p/{node.peer_id}" for a in args.announce] if args.announce else None
        _announce(role="hop", peer_id=node.peer_id, addrs=addrs or node.addrs)
        await trio.sleep_forever()


async def _fetch(args: argparse.Namespace) -> None:
    from shardcast.nat import open_cli_node

    async with open_cli_node(args, []) as (_, mounts):
        await _fetch_with(args, mounts)


async def _fetch_with(args: argparse.Namespace, mounts: dict | None) -> None:
    from shardcast.client import Client
    from shardcast.errors import FetchError
    from shardcast.fetcher import FetchPolicy, http_client

    pid, key = _pool(args)
    policy = FetchPolicy(
        parallel=args.parallel, max_attempts=args.attempts, read_timeout=args.read_timeout
    )
    client = Client(
        args.source,
        args.dest,
        public_key=key,
        pool_id=pid,
        keep=args.keep,
        policy=policy,
        http=http_client(policy, mounts),
    )
    try:
        version: int | str = "latest" if args.version == "latest" else int(args.version)
        if version == "latest" and args.wait > 0:
            found = await client.wait_for_newer(args.after, timeout=args.wait)
            if found is None:
                raise FetchError(f"no version newer than {args.after} after {args.wait}s")
            version = found
        while True:
            r = await client.fetch(version)
            _announce(
                version=r.version,
                path=str(r.path),
                payload_bytes=r.payload_bytes,
                seconds=round(r.seconds, 3),
                bad_shards=[vars(b) for b in r.bad_shards],
            )
            if not args.follow:
                return
            newer = None
            while newer is None:
                newer = await client.wait_for_newer(r.version, timeout=60.0)
            version = newer
    finally:
        await client.aclose()


COMMANDS = {
    "origin": _origin,
    "publish": _publish,
    "relay": _relay,
    "hop": _hop,
    "fetch": _fetch,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args, default="warning")
    raise_open_files_limit()
    try:
        trio.run(COMMANDS[args.command], args)
    except SwarmError as e:
        print(f"shardcast {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
