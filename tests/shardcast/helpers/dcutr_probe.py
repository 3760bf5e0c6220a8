"""Dials a member through its /p2p-circuit address, then waits for DCUtR to add a direct
connection; for the NAT tests.

Run as `python dcutr_probe.py LISTEN PEER_ID CIRCUIT_ADDR`; prints one JSON line:
{"relayed": bool, "direct": [addresses], "seconds": s, "stream_direct": bool}.
"""

from __future__ import annotations

import json
import sys

import trio

from protocol.identity import Identity
from shardcast.nat import open_node
from shardcast.p2p import PROTOCOL_ID


async def stream_after_punch(node, peer: str, attempts: int = 5):
    """A new stream to `peer`, tried again for a while: right after a punch the two sides may
    still be settling which of their connections (simultaneous open, the relayed one) stays,
    and a stream opened on one being closed fails its negotiation. A node's fetches retry the
    same way."""
    for _ in range(attempts - 1):
        try:
            return await node.open_stream(peer, PROTOCOL_ID)
        except Exception as e:
            print(f"stream after the punch failed ({e}); trying again", file=sys.stderr)
            await trio.sleep(1.0)
    return await node.open_stream(peer, PROTOCOL_ID)


async def main() -> None:
    listen, peer, circuit = sys.argv[1:4]
    from libp2p.peer.id import ID

    async with open_node(Identity.generate(), [listen]) as node:
        node.learn(peer, [circuit])
        first = await node.open_stream(peer, PROTOCOL_ID)
        relayed = "/p2p-circuit" in str(first.muxed_conn.get_transport_addresses())
        await first.reset()
        start = trio.current_time()
        direct: list[str] = []
        # py-libp2p drives hole punches every 2 s, 3 attempts per peer, 5 s a round: on a
        # loaded machine the first attempts can time out.
        with trio.move_on_after(45):
            while not direct:
                await trio.sleep(0.2)
                conns = node.raw.get_network().connections.get(ID.from_base58(peer)) or []
                for conn in conns if isinstance(conns, list) else [conns]:
                    addrs = [str(a) for a in conn.get_transport_addresses()]
                    if addrs and not any("/p2p-circuit" in a for a in addrs):
                        direct += addrs
        seconds = trio.current_time() - start
        after = await stream_after_punch(node, peer)
        on_direct = "/p2p-circuit" not in str(after.muxed_conn.get_transport_addresses())
        await after.reset()
        fields = {"relayed": relayed, "direct": direct, "seconds": round(seconds, 2)}
        print(json.dumps({**fields, "stream_direct": on_direct}), flush=True)


if __name__ == "__main__":
    trio.run(main)
