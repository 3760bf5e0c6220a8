"""What one stranger can make a host hold, below every check of ours: py-libp2p's default
security, muxer and inbound-connection layers against swarmrl's (`protocol/libp2p_stack.py`,
`protocol/inbound.py`).

The host runs in its own process (our `Host`, a route that admits no one, as the coordinator's
submit route does for a stranger); the stranger, in this one, connects once and:

- window flood: opens one stream and writes `--flood-mib` MiB into it as if the receive
  window did not exist (py-libp2p only logs that);
- lingering streams: opens `--streams` identify streams, writes 256 KiB (one window, within
  the rules) into each and never closes them;
- claimed id: dials with `/plaintext/2.0.0` presenting a member's public key it does not hold;
- address flood: `--identities` fresh identities in turn, each listing `--addrs` addresses in
  identify (and in its signed peer record), then leaving;
- churn: connects and disconnects `--churn` times, one connection at a time, then a fresh
  honest peer tries to connect (py-libp2p gives an inbound slot back only when the host
  stops). The host's rate per address does not count loopback, as in the simulated swarm, so
  this measures the slots alone; from elsewhere each connection also waits its turn at 2 a second.

For each stack it reports the host's resident memory and the bytes its muxers buffer right after
each attack, and again after `--linger-wait` seconds with the stranger still connected.

    python bench/muxer_flood.py
    python bench/muxer_flood.py --flood-mib 1024 --streams 500 --churn 600

Prints a table and writes bench/results/muxer_flood.json (and .md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardcast_common import HostProcess, machine, save, table

from protocol.host import Host, HostConfig
from protocol.identity import Identity
from protocol.libp2p_stack import buffered_bytes
from protocol.wire import Message

POOL = "benchpoolaaaaaaaaaaaaaaa"
MEMBERS_ONLY = "/swarmrl-bench/members/1"
IDENTIFY = "/ipfs/id/1.0.0"
MiB = 1024 * 1024
STACKS = ("py-libp2p default", "swarmrl")


class Beat(Message, tag="bench-beat"):
    max_bytes: ClassVar[int] = 256
    n: int


# ------------------------------------------------------------------ the host's process


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def serve(stack: str, member: str) -> None:
    """The host; on each line of stdin it prints its memory, buffers and connected peers."""
    if stack == "py-libp2p default":
        import libp2p

        import protocol.libp2p_stack

        # The baseline: our Host on py-libp2p's own choice of layers, as before this bench.
        protocol.libp2p_stack.new_host = lambda key_pair, inbound=None, **kw: libp2p.new_host(
            key_pair=key_pair, **kw
        )

    async def never(request: Any) -> Beat:
        return Beat(n=0)

    async with Host.open(Identity.generate(), POOL, config=HostConfig(gossip=False)) as host:
        host.serve(MEMBERS_ONLY, never, Beat, Beat, allowed_signer=lambda key: False)
        print("ADDR", host.addrs[0], flush=True)
        while await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True):
            store = host.libp2p.get_peerstore()
            records = store.peer_record_map.values()
            facts = {
                "rss_mb": rss_mb(),
                "peer_addrs": sum(len(d.addrs) for d in store.peer_data_map.values()),
                "record_kb": sum(len(r.envelope.raw_payload) for r in records) / 1024,
                "buffered_mb": buffered_bytes(host.libp2p) / MiB,
                "member_connected": member in host.connected_peers(),
            }
            print(json.dumps(facts), flush=True)


# ------------------------------------------------------------------ the stranger


async def window_flood(raw: Any, peer: Any, mib: int) -> dict:
    from libp2p.custom_types import TProtocol

    stream = await raw.new_stream(peer, [TProtocol(MEMBERS_ONLY)])
    sent, chunk = 0, b"x" * MiB
    start = time.perf_counter()
    try:
        await stream.write(b"\x00\x00\x01\x00")  # a 256-byte frame header: refused, unread
        for _ in range(mib):
            stream.muxed_stream.send_window = 1 << 40  # a muxer that ignores the window
            await stream.write(chunk)
            sent += 1
    except Exception:
        pass  # the host hung up
    return {"sent_mib": sent, "seconds": time.perf_counter() - start}


async def lingering_streams(raw: Any, peer: Any, count: int) -> dict:
    from libp2p.custom_types import TProtocol

    held, start = [], time.perf_counter()
    try:
        for _ in range(count):
            stream = await raw.new_stream(peer, [TProtocol(IDENTIFY)])
            with trio.move_on_after(5):
                await stream.write(b"y" * (256 * 1024))
            held.append(stream)
    except Exception:
        pass
    return {"streams": len(held), "seconds": time.perf_counter() - start}


async def claimed_id(addr: str, member: Identity) -> bool:
    """Whether a plaintext dialler presenting `member`'s public key gets a connection."""
    import libp2p
    import multiaddr
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.keys import KeyPair
    from libp2p.custom_types import TProtocol
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

    own, claimed = create_new_key_pair(), member.libp2p_key_pair().public_key

    class ClaimedKey:  # answers with the member's public key; holds only its own secret
        def get_public_key(self) -> Any:
            return claimed

        def __getattr__(self, name: str) -> Any:
            return getattr(own.private_key, name)

    plaintext = InsecureTransport(KeyPair(ClaimedKey(), claimed))
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    raw = libp2p.new_host(
        key_pair=own, listen_addrs=listen, sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): plaintext}
    )
    async with raw.run(listen):
        try:
            await raw.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))
            return True
        except Exception:
            return False


async def address_flood(addr: str, identities: int, addrs: int) -> dict:
    """Fresh identities in turn, each listing `addrs` addresses, identified, then gone."""
    import libp2p
    import multiaddr
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.peerinfo import info_from_p2p_addr

    listed = [
        multiaddr.Multiaddr(f"/ip4/10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}/tcp/4001")
        for i in range(addrs)
    ]
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    start = time.perf_counter()
    for _ in range(identities):
        raw = libp2p.new_host(
            key_pair=create_new_key_pair(), listen_addrs=listen, announce_addrs=listed
        )
        async with raw.run(listen):
            await raw.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))
            await trio.sleep(1.5)  # identify runs on the new connection
            await raw.close()
    return {"identities": identities, "seconds": time.perf_counter() - start}


async def churn(addr: str, times: int) -> dict:
    """One peer connects and disconnects `times` times, never holding two connections; then
    a fresh peer tries once. A refused connection fails its handshake."""
    import libp2p
    import multiaddr
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.peerinfo import info_from_p2p_addr

    from protocol.host import connection_config

    info = info_from_p2p_addr(multiaddr.Multiaddr(addr))

    async def connects(raw: Any) -> bool:
        raw.get_network().unblock_peer(info.peer_id)  # py-libp2p backs off a failed dial
        try:
            with trio.fail_after(5):
                await raw.connect(info)
            return True
        except Exception:
            return False

    admitted, first_refused, start = 0, None, time.perf_counter()
    raw = libp2p.new_host(key_pair=create_new_key_pair(), connection_config=connection_config(5))
    async with raw.run([]):
        for i in range(times):
            if await connects(raw):
                admitted += 1
                await raw.disconnect(info.peer_id)
            elif first_refused is None:
                first_refused = i + 1
        await raw.close()
    seconds = time.perf_counter() - start
    honest = libp2p.new_host(key_pair=create_new_key_pair(), connection_config=connection_config(5))
    async with honest.run([]):
        honest_connects = await connects(honest)
        await honest.close()
    return {
        "connections": times,
        "admitted": admitted,
        "first_refused": first_refused,
        "seconds": seconds,
        "honest_connects_after": honest_connects,
    }


async def attack(server: HostProcess, member: Identity, args: argparse.Namespace) -> dict:
    from libp2p.peer.id import ID

    out: dict[str, Any] = {"at_rest": server.facts()}
    out["claimed_id_connects"] = await claimed_id(server.addr, member)
    out["claimed_id_facts"] = server.facts()
    async with Host.open(Identity.generate(), POOL, config=HostConfig(gossip=False)) as host:
        peer = ID.from_base58(await host.connect(server.addr))
        out["window_flood"] = await window_flood(host.libp2p, peer, args.flood_mib)
        await trio.sleep(1.0)
        out["after_window_flood"] = server.facts()
    async with Host.open(Identity.generate(), POOL, config=HostConfig(gossip=False)) as host:
        peer = ID.from_base58(await host.connect(server.addr))
        out["lingering"] = await lingering_streams(host.libp2p, peer, args.streams)
        await trio.sleep(1.0)
        out["after_lingering"] = server.facts()
        await trio.sleep(args.linger_wait)
        out["after_linger_wait"] = server.facts()
    out["address_flood"] = await address_flood(server.addr, args.identities, args.addrs)
    out["after_address_flood"] = server.facts()
    out["churn"] = await churn(server.addr, args.churn)
    return out


def run_stack(stack: str, args: argparse.Namespace) -> dict:
    member = Identity.generate()
    server = HostProcess([sys.executable, __file__, "--serve", stack, "--member", member.peer_id()])
    try:
        return {"stack": stack, **trio.run(attack, server, member, args)}
    finally:
        server.close()


HEADERS = [
    "stack",
    "claimed id connects",
    "flood: MiB sent",
    "flood: host buffered MiB",
    "flood: host RSS MB",
    "lingering: streams",
    "lingering: buffered MiB",
    "buffered MiB later",
    "addresses: kept",
    "addresses: record KiB",
    "addresses: host RSS MB",
    "churn: admitted",
    "churn: first refused",
    "honest peer connects after",
    "host RSS MB at rest",
]


def row(r: dict) -> list:
    return [
        r["stack"],
        r["claimed_id_connects"],
        r["window_flood"]["sent_mib"],
        round(r["after_window_flood"]["buffered_mb"], 1),
        round(r["after_window_flood"]["rss_mb"]),
        r["lingering"]["streams"],
        round(r["after_lingering"]["buffered_mb"], 1),
        round(r["after_linger_wait"]["buffered_mb"], 1),
        r["after_address_flood"]["peer_addrs"],
        round(r["after_address_flood"]["record_kb"]),
        round(r["after_address_flood"]["rss_mb"]),
        f"{r['churn']['admitted']} of {r['churn']['connections']}",
        r["churn"]["first_refused"] or "none",
        r["churn"]["honest_connects_after"],
        round(r["at_rest"]["rss_mb"]),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--flood-mib", type=int, default=512, help="window flood size (default 512)")
    p.add_argument("--streams", type=int, default=200, help="lingering streams (default 200)")
    p.add_argument("--identities", type=int, default=10, help="address flood identities")
    p.add_argument("--addrs", type=int, default=15000, help="addresses each lists (15000)")
    p.add_argument("--linger-wait", type=float, default=40.0, help="seconds, then look again")
    p.add_argument("--churn", type=int, default=400, help="connections opened and closed (400)")
    p.add_argument("--serve", choices=STACKS, help=argparse.SUPPRESS)
    p.add_argument("--member", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        trio.run(serve, args.serve, args.member)
        return 0
    results = [run_stack(stack, args) for stack in STACKS]
    markdown = (
        f"muxer_flood: one stranger, one connection per attack; a {args.flood_mib} MiB window "
        f"flood, {args.streams} identify streams left open with 256 KiB each, "
        f"'later' = {args.linger_wait:g} s after, still connected; {args.identities} identities "
        f"listing {args.addrs} addresses each; {args.churn} connections opened and closed in "
        f"turn, then one honest peer\n\n" + table(HEADERS, [row(r) for r in results])
    )
    save("muxer_flood", {"machine": machine(), "args": vars(args), "stacks": results}, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
