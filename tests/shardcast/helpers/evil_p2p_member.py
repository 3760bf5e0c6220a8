"""A member behind NAT that serves corrupt bytes over libp2p streams: for fault tests.

Run as `python evil_p2p_member.py UPSTREAM ROOT POOL_ID PUBLIC_KEY_HEX SHARD_SIZE HOST
HOP_ADDR`; mirrors UPSTREAM honestly, then serves through a reservation on the relay hop at
HOP_ADDR with one byte of every even-indexed shard flipped (`evil_relay.corrupting`). Prints
the same JSON announcement as `shardcast relay --p2p-relay`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio
from evil_relay import corrupting

from protocol.identity import Identity
from shardcast.nat import open_node
from shardcast.relay import Relay


async def main() -> None:
    upstream, root, pool_id, key, shard, host, hop = sys.argv[1:8]
    relay = Relay(
        [upstream], Path(root), public_key=bytes.fromhex(key), pool_id=pool_id, poll_wait=2
    )
    relay.app = corrupting(relay.app, int(shard))
    async with (
        open_node(Identity.generate(), [f"/ip4/{host}/tcp/0"]) as node,
        trio.open_nursery() as nursery,
    ):
        url = await nursery.start(relay.run, host, 0)
        _, addrs = await node.serve_member(url, [hop])
        fields = {"role": "evil-relay", "url": url, "peer_id": node.peer_id}
        print(json.dumps({**fields, "p2p_addrs": addrs}), flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main)
