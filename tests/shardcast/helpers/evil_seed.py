"""A swarm member that announces itself, claims every shard, and corrupts the even ones.

Run as `python evil_seed.py UPSTREAM ROOT POOL_ID PUBLIC_KEY_HEX SHARD_SIZE`; prints the
same JSON announcement as `python -m shardcast.seed`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio
from evil_relay import corrupting

from protocol.identity import Identity
from shardcast.relay import Relay


async def main() -> None:
    upstream, root, pool_id, key, shard = sys.argv[1:6]
    relay = Relay(
        [upstream],
        Path(root),
        public_key=bytes.fromhex(key),
        pool_id=pool_id,
        identity=Identity.generate(),
    )
    relay.app = corrupting(relay.app, int(shard))
    async with trio.open_nursery() as nursery:
        url = await nursery.start(relay.run)
        print(json.dumps({"role": "evil-seed", "url": url}), flush=True)


if __name__ == "__main__":
    trio.run(main)
