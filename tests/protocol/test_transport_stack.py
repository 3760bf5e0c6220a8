"""The layers under every request: who a connection is, and what its peer can make us buffer.

Real libp2p hosts on 127.0.0.1. The attackers are py-libp2p hosts built the way a stranger would
build them: with the security or muxer of their choice, a key they claim but do not hold, or a
stream that ignores the receive window it was given. Each attack is first shown to work against
py-libp2p's default stack (the control), then to fail against ours.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import libp2p
import multiaddr
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.mplex.mplex import MPLEX_PROTOCOL_ID, Mplex

from protocol import libp2p_stack
from protocol.envelope import Verified
from protocol.host import ErrorCode, Host, HostConfig
from protocol.identity import Identity
from protocol.libp2p_stack import buffered_bytes
from protocol.wire import Message

pytestmark = pytest.mark.trio

POOL = "testpoolaaaaaaaaaaaaaaaa"
ECHO = "/swarmrl-test/echo/1"
SINK = "/swarmrl-test/sink/1"
MiB = 1024 * 1024
LOCAL = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


class Ping(Message, tag="test-ping"):
    max_bytes: ClassVar[int] = 256
    n: int


async def echo(request: Verified[Ping]) -> Ping:
    return Ping(n=request.message.n + 1)


class _ClaimedKey:
    """A private key that answers with someone else's public key: what a dialler without the
    member's secret can present. Signing uses its own key."""

    def __init__(self, claimed: Any) -> None:
        self._own = create_new_key_pair().private_key
        self._claimed = claimed

    def get_public_key(self) -> Any:
        return self._claimed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._own, name)


def claiming(member: Identity) -> KeyPair:
    public = member.libp2p_key_pair().public_key
    return KeyPair(_ClaimedKey(public), public)  # type: ignore[arg-type]


@asynccontextmanager
async def stranger(**new_host_args: Any) -> AsyncIterator[Any]:
    """A py-libp2p host as a stranger builds it: its own key, whatever else it is given."""
    raw = libp2p.new_host(key_pair=create_new_key_pair(), listen_addrs=LOCAL, **new_host_args)
    async with raw.run(LOCAL):
        yield raw


@asynccontextmanager
async def default_stack_victim() -> AsyncIterator[tuple[Any, str]]:
    """A host on py-libp2p's default stack: what our hosts were before (the controls)."""
    raw = libp2p.new_host(key_pair=create_new_key_pair(), listen_addrs=LOCAL)
    async with raw.run(LOCAL):
        addr = f"{raw.get_addrs()[0]}"
        yield raw, addr


async def connect(raw: Any, addr: str) -> Any:
    info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
    await raw.connect(info)
    return info.peer_id


def connected_ids(raw: Any) -> set[str]:
    return {p.to_base58() for p in raw.get_network().connections}


async def test_a_plaintext_dialler_cannot_claim_a_member_id():
    member = Identity.generate()
    plaintext = InsecureTransport(claiming(member))
    sec = {TProtocol(PLAINTEXT_PROTOCOL_ID): plaintext}

    # Control: py-libp2p's default stack takes the claim, and the connection is "the member".
    async with default_stack_victim() as (victim, addr), stranger(sec_opt=sec) as liar:
        await connect(liar, addr)
        assert member.peer_id() in connected_ids(victim)

    refusals: list[tuple[str, str]] = []
    async with Host.open(Identity.generate(), POOL, config=HostConfig(gossip=False)) as host:
        host.serve(ECHO, echo, Ping, Ping)
        host.on_refusal = lambda peer_id, code, detail: refusals.append((peer_id, code))
        async with stranger(sec_opt=sec) as liar:
            with pytest.raises(Exception, match="unable to connect"):
                await connect(liar, host.addrs[0])
        assert member.peer_id() not in host.connected_peers()
        assert refusals == []


def noise_as(key_pair: KeyPair) -> dict[TProtocol, NoiseTransport]:
    x25519 = libp2p.create_new_x25519_key_pair().private_key
    return {NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=x25519)}


async def test_a_noise_dialler_without_the_members_key_is_refused():
    member = Identity.generate()
    async with Host.open(Identity.generate(), POOL, config=HostConfig(gossip=False)) as host:
        # Control: the same stranger under its own key is let in.
        own = create_new_key_pair()
        raw = libp2p.new_host(key_pair=own, listen_addrs=LOCAL, sec_opt=noise_as(own))
        async with raw.run(LOCAL):
            await connect(raw, host.addrs[0])
        async with stranger(sec_opt=noise_as(claiming(member))) as liar:
            with pytest.raises(Exception, match="unable to connect"):
                await connect(liar, host.addrs[0])
        assert member.peer_id() not in host.connected_peers()


async def test_a_dialler_offering_only_mplex_cannot_connect():
    # mplex has no flow control at all; our hosts offer yamux alone.
    only_mplex = {TProtocol(MPLEX_PROTOCOL_ID): Mplex}
    async with default_stack_victim() as (_, addr), stranger(muxer_opt=only_mplex) as peer:
        await connect(peer, addr)  # control: py-libp2p's default stack takes it
    async with (
        Host.open(Identity.generate(), POOL, config=HostConfig(gossip=False)) as host,
        stranger(muxer_opt=only_mplex) as peer,
    ):
        with pytest.raises(Exception, match="unable to connect"):
            await connect(peer, host.addrs[0])


async def flood_ignoring_window(attacker: Any, victim_id: Any, protocol: str, mib: int) -> int:
    """Open a stream and write `mib` MiB regardless of the window; the MiB that went out."""
    stream = await attacker.new_stream(victim_id, [TProtocol(protocol)])
    chunk = b"x" * MiB
    sent = 0
    try:
        for _ in range(mib):
            stream.muxed_stream.send_window = 1 << 40  # what a hostile muxer would believe
            await stream.write(chunk)
            sent += 1
    except Exception:
        pass  # the victim hung up: what it should do
    return sent


async def test_a_peer_sending_past_its_window_is_disconnected_and_nothing_is_buffered_bytes():
    # Control: py-libp2p's yamux buffers whatever arrives on a stream nobody reads.
    async with default_stack_victim() as (victim, addr), stranger() as attacker:
        victim.set_stream_handler(TProtocol(SINK), lambda stream: trio.sleep_forever())
        victim_id = await connect(attacker, addr)
        await flood_ignoring_window(attacker, victim_id, SINK, 24)
        with trio.move_on_after(10):
            while buffered_bytes(victim) < 16 * MiB:
                await trio.sleep(0.05)
        assert buffered_bytes(victim) >= 16 * MiB

    async with Host.open(Identity.generate(), POOL, config=HostConfig(gossip=False)) as host:
        host.serve(ECHO, echo, Ping, Ping)
        refusals = []
        host.on_refusal = lambda *refusal: refusals.append(refusal)
        async with stranger() as attacker:
            victim_id = await connect(attacker, host.addrs[0])
            sent = await flood_ignoring_window(attacker, victim_id, ECHO, 64)
            with trio.move_on_after(10):
                while connected_ids(attacker):
                    await trio.sleep(0.05)
            assert not connected_ids(attacker), "the victim kept the connection"
            assert sent < 64
            assert buffered_bytes(host.libp2p) <= 256 * 1024
            # Counted against the identity: reported as a bad request (a member's strike on
            # the coordinator) and cut off, so its next connection's streams are reset.
            attacker_id = str(attacker.get_id())
            # (its junk frame was refused `too_large` first, as any peer's would be)
            window = [(p, c) for p, c, detail in refusals if "receive window" in detail]
            assert window == [(attacker_id, ErrorCode.BAD_REQUEST)]
            assert host.stats.window_violations == 1 and host.stats.cutoffs == 1
            await connect(attacker, host.addrs[0])
            with pytest.raises(StreamFailure):
                await attacker.new_stream(victim_id, [TProtocol(ECHO)])
        # Everyone else is still served.
        async with Host.open(Identity.generate(), POOL, config=HostConfig(gossip=False)) as honest:
            reply = await honest.request(host.addrs[0], ECHO, Ping(n=1), Ping)
            assert reply.message.n == 2


async def test_a_peer_keeping_to_its_window_delivers_everything_to_a_slow_reader():
    # The window rule has no slack, so an honest bulk transfer through window updates must
    # never trip it: 40 MiB into a reader that takes its time.
    size = 40 * MiB
    received = trio.Event()
    got = bytearray()

    async def slow_sink(stream: Any) -> None:
        while len(got) < size:
            data = await stream.read(1 << 20)
            if not data:
                break
            got.extend(data)
            await trio.sleep(0.001)
        received.set()

    async with Host.open(Identity.generate(), POOL, config=HostConfig(gossip=False)) as server:
        server.libp2p.set_stream_handler(TProtocol(SINK), slow_sink)
        async with Host.open(Identity.generate(), POOL, config=HostConfig(gossip=False)) as client:
            peer_id = await client.connect(server.addrs[0])
            stream = await client.libp2p.new_stream(ID.from_base58(peer_id), [TProtocol(SINK)])
            payload = bytes(range(256)) * (size // 256)
            with trio.fail_after(60):
                await stream.write(payload)
                await received.wait()
            assert bytes(got) == payload
            assert client.peer_id in server.connected_peers()


IDENTIFY = "/ipfs/id/1.0.0"  # py-libp2p's own: it answers and closes, reading nothing


async def leave_streams_open(attacker: Any, victim_id: Any, count: int, size: int) -> list[Any]:
    """`count` identify streams, each sent `size` bytes (within the window) and never closed."""
    streams = []
    for _ in range(count):
        stream = await attacker.new_stream(victim_id, [TProtocol(IDENTIFY)])
        await stream.write(b"y" * size)
        streams.append(stream)
    return streams


async def test_streams_a_peer_leaves_open_after_we_closed_ours_are_capped_then_reset(monkeypatch):
    monkeypatch.setattr(libp2p_stack, "LINGER_S", 1.0)
    monkeypatch.setattr(libp2p_stack, "REAP_EVERY_S", 0.2)
    count, size = 3 * libp2p_stack.MAX_LINGERING // 2, 128 * 1024

    # Control: py-libp2p keeps every byte for as long as the connection lives.
    async with default_stack_victim() as (victim, addr), stranger() as attacker:
        kept = await leave_streams_open(attacker, await connect(attacker, addr), count, size)
        await trio.sleep(2.0)
        assert buffered_bytes(victim) >= count * size * 0.9
        del kept

    async with Host.open(Identity.generate(), POOL, config=HostConfig(gossip=False)) as host:
        host.serve(ECHO, echo, Ping, Ping)
        async with stranger() as attacker:
            victim_id = await connect(attacker, host.addrs[0])
            kept = await leave_streams_open(attacker, victim_id, count, size)
            await trio.sleep(0.1)
            assert buffered_bytes(host.libp2p) <= libp2p_stack.MAX_LINGERING * size
            with trio.move_on_after(10):
                while buffered_bytes(host.libp2p):
                    await trio.sleep(0.1)
            assert buffered_bytes(host.libp2p) == 0
            assert connected_ids(attacker), "lingering streams cost a stream, not the connection"
            del kept
        async with Host.open(Identity.generate(), POOL, config=HostConfig(gossip=False)) as honest:
            reply = await honest.request(host.addrs[0], ECHO, Ping(n=1), Ping)
            assert reply.message.n == 2


def addrs_known(raw: Any, peer: str) -> int:
    store = raw.get_peerstore()
    peer_id = ID.from_base58(peer)
    data = store.peer_data_map.get(peer_id)
    return len(data.addrs) if data is not None else 0


def record_bytes(raw: Any, peer: str) -> int:
    state = raw.get_peerstore().peer_record_map.get(ID.from_base58(peer))
    return len(state.envelope.raw_payload) if state is not None else 0


async def test_a_peer_listing_thousands_of_addresses_is_kept_to_its_newest_few():
    many = [multiaddr.Multiaddr(f"/ip4/10.9.{i // 256}.{i % 256}/tcp/4001") for i in range(3000)]

    async def identified(raw: Any, peer: str) -> None:
        with trio.move_on_after(15):
            while not addrs_known(raw, peer):
                await trio.sleep(0.1)
        await trio.sleep(0.5)  # identify stores the addresses, then the record

    # Control: py-libp2p's default store keeps all 3,000, and a signed record listing them.
    async with default_stack_victim() as (victim, addr), stranger(announce_addrs=many) as liar:
        await connect(liar, addr)
        await identified(victim, liar.get_id().to_base58())
        assert addrs_known(victim, liar.get_id().to_base58()) >= 3000
        assert record_bytes(victim, liar.get_id().to_base58()) > 50_000

    async with (
        Host.open(Identity.generate(), POOL, config=HostConfig(gossip=False)) as host,
        stranger(announce_addrs=many) as liar,
    ):
        await connect(liar, host.addrs[0])
        peer = liar.get_id().to_base58()
        await identified(host.libp2p, peer)
        assert 0 < addrs_known(host.libp2p, peer) <= libp2p_stack.MAX_ADDRS_PER_PEER
        assert record_bytes(host.libp2p, peer) == 0
