"""A relay that corrupts one byte of every shard whose index is even: for fault tests.

Run as `python evil_relay.py UPSTREAM ROOT POOL_ID PUBLIC_KEY_HEX SHARD_SIZE`; prints the
same JSON announcement as `shardcast relay`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import trio

from shardcast.relay import Relay

_RANGE = re.compile(rb"bytes=(\d+)-")


def corrupting(app, shard_size: int):
    async def wrapped(scope, receive, send):
        if scope["type"] != "http" or "/f/" not in scope["path"]:
            return await app(scope, receive, send)
        rng = dict(scope["headers"]).get(b"range", b"bytes=0-")
        m = _RANGE.match(rng)
        start = int(m.group(1)) if m else 0
        bad = (start // shard_size) % 2 == 0
        done = False

        async def evil_send(message):
            nonlocal done
            if bad and not done and message["type"] == "http.response.body" and message["body"]:
                body = bytearray(message["body"])
                body[0] ^= 0xFF
                message = {**message, "body": bytes(body)}
                done = True
            await send(message)

        await app(scope, receive, evil_send)

    return wrapped


async def main() -> None:
    upstream, root, pool_id, key, shard = sys.argv[1:6]
    relay = Relay(
        [upstream], Path(root), public_key=bytes.fromhex(key), pool_id=pool_id, poll_wait=2
    )
    relay.app = corrupting(relay.app, int(shard))
    async with trio.open_nursery() as nursery:
        url = await nursery.start(relay.run)
        print(json.dumps({"role": "evil-relay", "url": url}), flush=True)


if __name__ == "__main__":
    trio.run(main)
