"""One logging setup for every command (`node`, `coordinator`, `shardcast`).

Each takes the same `--version`, `--log-level`, `--quiet` and `--libp2p-log-level`, before or
after its subcommand. Logs go to stderr in one format. Libraries that talk a lot stay quiet
unless asked: py-libp2p logs every failed dial at ERROR and, having no handler of its own,
reaches stderr through Python's last-resort handler (an unreachable bootstrap printed 64 lines
in 25 s), so its loggers are off unless `--libp2p-log-level` (or its own `LIBP2P_DEBUG`) asks.
"""

from __future__ import annotations

import argparse
import logging
import os
from importlib.metadata import PackageNotFoundError, version

LEVELS = ("debug", "info", "warning", "error")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Per-request INFO lines from the HTTP client and server: useful only when debugging.
_CHATTY = ("httpx", "httpcore", "hypercorn.access", "hpack")
_OFF = logging.CRITICAL + 1


def swarmrl_version() -> str:
    try:
        return version("swarmrl")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def logging_flags(prog: str, with_version: bool = True) -> argparse.ArgumentParser:
    """A parent parser with the shared flags. Give it to the main parser and to every
    subparser: its defaults are SUPPRESS, so a flag given in either place wins and an absent
    one does not overwrite the other's value. `with_version=False` for subcommands whose own
    `--version` means something else (`shardcast publish --version N`)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("logging")
    if with_version:
        version = f"{prog} (swarmrl) {swarmrl_version()}"
        g.add_argument("--version", action="version", version=version)
    g.add_argument(
        "--log-level",
        choices=LEVELS,
        type=str.lower,
        default=argparse.SUPPRESS,
        help="level of swarmrl's own logs (default: info; shardcast: warning)",
    )
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="warnings and errors only: no status line, no info logs",
    )
    g.add_argument(
        "--libp2p-log-level",
        choices=LEVELS,
        type=str.lower,
        default=argparse.SUPPRESS,
        help="also show py-libp2p's own logs at this level (default: off)",
    )
    return p


def is_quiet(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "quiet", False))


def setup_logging(args: argparse.Namespace, default: str = "info") -> None:
    """Configure the root logger from the shared flags (call once, in `main`)."""
    level = getattr(args, "log_level", None) or ("warning" if is_quiet(args) else default)
    numeric = getattr(logging, level.upper())
    logging.basicConfig(level=numeric, format=FORMAT, force=True)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


def tame_libp2p(args: argparse.Namespace) -> None:
    """Quiet py-libp2p's loggers unless asked. Call it in commands that use libp2p, before
    they start a host: importing libp2p resets its loggers, so this imports it first."""
    import libp2p  # noqa: F401  (its import-time logging setup must run before ours)

    if os.environ.get("LIBP2P_DEBUG"):
        return  # libp2p's own switch: leave its handlers as it set them
    asked = getattr(args, "libp2p_log_level", None)
    logger = logging.getLogger("libp2p")
    logger.handlers.clear()
    logger.addHandler(logging.NullHandler())  # never the last-resort handler
    logger.setLevel(getattr(logging, asked.upper()) if asked else _OFF)
    logger.propagate = bool(asked)  # when asked, through the root handler and its format
