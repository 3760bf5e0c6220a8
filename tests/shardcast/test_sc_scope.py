"""Which gossiped URLs a member follows (`shardcast.scope`): none nearer than the pool."""

from __future__ import annotations

import time

import httpx
import pytest
import trio

from protocol.identity import Identity
from protocol.ratelimit import TokenBucket
from shardcast.peerlist import PeerListHolder, sign_peer_list
from shardcast.peers import PeerTable, announce
from shardcast.scope import Scope, dial_floor, may_follow, plain_ip, pool_scope, scope_of
from shardcast.sources import SourcePicker
from shardcast.swarm import PeerWatch


@pytest.mark.parametrize(
    "ip, scope",
    [
        ("127.0.0.1", Scope.LOOPBACK),
        ("127.8.9.10", Scope.LOOPBACK),
        ("0.0.0.0", Scope.LOOPBACK),  # reaches this machine on Linux
        ("::1", Scope.LOOPBACK),
        ("::ffff:127.0.0.1", Scope.LOOPBACK),  # mapped: judged as its IPv4 address
        ("10.0.0.1", Scope.PRIVATE),
        ("172.16.5.4", Scope.PRIVATE),
        ("192.168.1.1", Scope.PRIVATE),
        ("169.254.169.254", Scope.PRIVATE),  # link-local: a cloud's metadata service
        ("100.64.0.1", Scope.PRIVATE),  # shared (carrier NAT) space
        ("fc00::1", Scope.PRIVATE),
        ("fe80::1", Scope.PRIVATE),
        ("::ffff:10.0.0.1", Scope.PRIVATE),
        ("8.8.8.8", Scope.PUBLIC),
        ("2606:4700::1111", Scope.PUBLIC),
        ("224.0.0.1", None),  # multicast: never dialled
        ("240.0.0.1", None),  # reserved
    ],
)
def test_scope_of_an_address(ip: str, scope: Scope | None) -> None:
    assert scope_of(plain_ip(ip)) is scope


def test_a_pool_reaches_as_far_as_its_most_public_source() -> None:
    assert pool_scope([]) is Scope.PUBLIC
    assert pool_scope(["http://127.0.0.1:8000"]) is Scope.LOOPBACK
    assert pool_scope(["http://10.0.0.1:8000", "p2p://peer/x"]) is Scope.PRIVATE
    assert pool_scope(["http://127.0.0.1:1", "http://10.0.0.1:1"]) is Scope.PRIVATE
    assert pool_scope(["http://10.0.0.1", "https://8.8.8.8"]) is Scope.PUBLIC
    assert pool_scope(["https://pool.example.org"]) is Scope.PUBLIC  # a name counts as public
    assert pool_scope(["http://localhost:7102"]) is Scope.LOOPBACK  # but localhost is here


@pytest.mark.parametrize(
    "url, public, private",
    [
        ("http://8.8.8.8:8000", True, True),
        ("https://[2606:4700::1111]:443", True, True),
        ("http://10.1.2.3:8000", False, True),
        ("http://[::ffff:10.0.0.1]:80", False, True),
        ("http://169.254.169.254", False, True),
        ("http://127.0.0.1:7102", False, False),  # the origin's own port, on the member's host
        ("http://0.0.0.0:22", False, False),
        ("http://[::1]:80", False, False),
        ("http://localhost:80", False, False),  # a name: resolved anywhere, at any time
        ("http://peer.example.org", False, False),
        ("http://224.0.0.1:80", False, False),
        ("p2p://peer/12D3KooW", False, False),  # never gossiped
    ],
)
def test_what_a_member_follows(url: str, public: bool, private: bool) -> None:
    assert may_follow(url, Scope.PUBLIC) is public
    assert may_follow(url, Scope.PRIVATE) is private
    assert may_follow(url, Scope.LOOPBACK)  # a pool on one machine: the swarm, the tests


def test_a_watch_follows_gossip_no_nearer_than_its_pool_and_everything_the_list_vouches_for():
    """A member of a pool served from a public address hears announcements aiming at its
    loopback, its LAN and a name: it follows only the public one, and the private URL the
    coordinator's signed list vouches for (the coordinator probed it at its node's own
    address)."""
    coordinator = Identity.generate()
    table = PeerTable("p")
    gossip = ["http://127.0.0.1:7102", "http://10.0.0.2:8601", "http://localhost:8601"]
    for url in [*gossip, "http://8.8.4.4:8601"]:
        assert table.add(announce(Identity.generate(), "p", url)) is not None
    listed = PeerListHolder(coordinator.public_key, "p")
    listed.offer(sign_peer_list(coordinator, "p", ["http://192.168.7.7:8601"], 1))
    origin = "http://8.8.8.8:8600"
    watch = PeerWatch(
        httpx.AsyncClient(), table, SourcePicker([origin]), [origin], Identity.generate(),
        peer_list=listed,
    )  # fmt: skip
    assert watch.scope is Scope.PUBLIC
    assert sorted(watch.peers()) == ["http://192.168.7.7:8601", "http://8.8.4.4:8601"]
    watch.learn()
    assert sorted(watch.picker.stats) == sorted([origin, *watch.peers()])


def test_a_hole_punch_dials_no_address_nearer_than_the_relay_hops() -> None:
    """DCUtR dials the addresses a peer reports: behind a public hop only public ones, behind
    a LAN hop private ones too, never this machine's (nor a DNS name) unless every hop is on
    it (reported in DCUtR or through identify). The filter sits where py-libp2p dials."""
    from multiaddr import Multiaddr

    from shardcast.nat import _scoped_dcutr_class

    public_hop = "/ip4/8.8.8.8/tcp/4001/p2p/12D3KooWHop"
    lan_hop = "/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWHop"
    assert dial_floor([public_hop]) is Scope.PUBLIC
    assert dial_floor([lan_hop]) is Scope.PRIVATE
    assert dial_floor([]) is Scope.PRIVATE
    assert dial_floor(["/ip4/127.0.0.1/tcp/1/p2p/x"]) is Scope.LOOPBACK
    assert dial_floor(["/dns4/hop.example.org/tcp/1/p2p/x"]) is Scope.PUBLIC

    reported = [
        "/ip4/127.0.0.1/tcp/22",
        "/ip6/::1/tcp/22",
        "/ip4/0.0.0.0/tcp/22",
        "/ip4/192.168.1.1/tcp/80",
        "/dns4/localhost/tcp/22",
        "/ip4/8.8.4.4/tcp/4001",
    ]
    dialled: list[str] = []

    class Recording(_scoped_dcutr_class()):
        def __init__(self) -> None:  # no host: only the dial decision is exercised
            self.dials = TokenBucket(1.0, 100, time.monotonic())  # the host's budget: ample

    async def fake_dial(self, peer_id, addr, *args, **kw) -> None:
        dialled.append(str(addr))

    kept = {}
    with pytest.MonkeyPatch.context() as mp:
        from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

        mp.setattr(DCUtRProtocol, "_dial_peer", fake_dial)  # what py-libp2p would dial
        puncher = Recording()
        for name, hops in (("public", [public_hop]), ("lan", [lan_hop]), ("none", [])):
            puncher.hops = lambda hops=hops: hops
            dialled.clear()
            for addr in reported:
                trio.run(puncher._dial_peer, "peer", Multiaddr(addr))
            kept[name] = list(dialled)
    assert kept["public"] == ["/ip4/8.8.4.4/tcp/4001"]
    assert kept["lan"] == kept["none"] == ["/ip4/192.168.1.1/tcp/80", "/ip4/8.8.4.4/tcp/4001"]
