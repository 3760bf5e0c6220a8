"""The node's live status: one line redrawn on a terminal, periodic lines in a log, or JSON."""

from __future__ import annotations

import json
import sys
import time

import trio

from node.worker import NodeStats


def status_line(s: NodeStats) -> str:
    return (
        f"v{s.version} (pool v{s.coordinator_version}) | {s.state} | leases {s.leases} | "
        f"{s.rollouts} rollouts | {s.tokens_per_s:.0f} tok/s | "
        f"accepted {s.accepted} rejected {s.soft_rejected}+{s.hard_rejected}"
        + (f" | restarted {s.restarts}x" if s.restarts else "")
    )


async def show_status(
    stats: NodeStats, json_lines: bool = False, every_s: float | None = None
) -> None:
    """Redraw the status line on a TTY every second; elsewhere print it every 10 s (or as
    JSON lines with `json_lines`), so logs stay readable."""
    tty = sys.stderr.isatty() and not json_lines
    every = every_s or (1.0 if tty else 10.0)
    while True:
        if json_lines:
            record = {k: v for k, v in vars(stats).items()}
            print(
                json.dumps({"time": time.time(), "tokens_per_s": stats.tokens_per_s, **record}),
                flush=True,
            )
        elif tty:
            print(f"\r\x1b[2K{status_line(stats)}", end="", file=sys.stderr, flush=True)
        else:
            print(status_line(stats), file=sys.stderr, flush=True)
        await trio.sleep(every)
