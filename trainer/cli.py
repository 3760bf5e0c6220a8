"""`coordinator`: run a swarmrl pool. `python -m trainer` is the same command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from protocol import poolspec
from protocol.errors import SwarmError
from protocol.identity import Identity, describe
from protocol.paths import swarmrl_home


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except SwarmError as e:
        print(f"coordinator: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coordinator",
        description="The coordinator of a swarmrl pool: leases work, validates, trains, publishes.",
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    keygen = sub.add_parser("keygen", help="create the coordinator's ed25519 signing key")
    keygen.add_argument(
        "--out",
        type=Path,
        default=swarmrl_home() / "coordinator.key",
        help="key file (default: %(default)s)",
    )
    keygen.set_defaults(run=_keygen)

    pid = sub.add_parser("id", help="print the pool id of a pool spec")
    pid.add_argument("spec", type=Path, help="pool spec TOML")
    pid.set_defaults(run=_pool_id)
    return parser


def _keygen(args: argparse.Namespace) -> int:
    identity = Identity.generate()
    identity.save(args.out)
    print(f"created the coordinator key (keep {args.out} private)")
    print(describe(identity, args.out))
    return 0


def _pool_id(args: argparse.Namespace) -> int:
    print(poolspec.pool_id(poolspec.load(args.spec)))
    return 0
