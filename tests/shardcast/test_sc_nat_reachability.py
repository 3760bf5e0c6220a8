"""The dial-back check against a real relay hop on loopback: a node listening on every
interface is reachable, and told so (it used to be told "private", advertising 0.0.0.0)."""

import trio

from protocol.identity import Identity
from shardcast.nat import HopLimits, Reachability, open_node, reachable_addrs


def test_nat_a_node_listening_on_every_interface_is_found_public() -> None:
    async def main() -> None:
        async with (
            open_node(Identity.generate(), hop=HopLimits()) as hop,
            open_node(Identity.generate(), ["/ip4/0.0.0.0/tcp/0"]) as node,
        ):
            assert node.addrs and not any("/0.0.0.0/" in a for a in node.addrs)
            assert node.addrs[-1].startswith("/ip4/127.0.0.1/")  # loopback last
            reach, addrs = await reachable_addrs(node, hop.addrs)
            assert reach is Reachability.PUBLIC
            assert addrs == node.addrs  # direct addresses, no relay slot taken
            assert not hop.holds_slot(node.peer_id)

    trio.run(main)
