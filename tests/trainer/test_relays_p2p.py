"""Stream sources (`p2p://peer/<id>`, nodes behind NAT) at the coordinator: which URLs it
accepts, that a node may only advertise its own peer id, that its check of such a source never
dials, and that its relay hop serves pool nodes in good standing only."""

from functools import partial

import pytest
import trio

from protocol.errors import TransportError
from protocol.host import Host
from protocol.identity import Identity, peer_id_of
from shardcast.nat import HopLimits, open_node
from shardcast.p2p import PROTOCOL_ID, p2p_url
from shardcast.peerlist import PeerListError, open_peer_list, sign_peer_list
from shardcast.probe import ProbeStatus, verify_source
from trainer.ledger import Ledger
from trainer.relays import (
    NO_SLOT,
    Checked,
    RelayDirectory,
    acceptable_url,
    admitted_peer,
    check_relay,
    probe_client,
    relay_hop,
)

KEY = Identity.generate()
PEER = KEY.peer_id()


def test_nat_only_bare_p2p_urls_with_a_valid_peer_id_are_probed():
    assert acceptable_url(f"p2p://peer/{PEER}")
    for bad in [
        f"p2p://peer/{PEER}/",
        f"p2p://peer/{PEER}/v/1",
        f"p2p://peer/{PEER}?x=1",
        f"p2p://other/{PEER}",
        f"p2p://{PEER}",
        "p2p://peer/",
        "p2p://peer/12D3KooWnotapeerid",
        "p2p://peer/" + "1" * 52,
        "p2p://peer/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # not an ed25519 id
        f"p2p://user@peer/{PEER}",
        f"P2P://peer/{PEER}",
    ]:
        assert not acceptable_url(bad), bad


def test_nat_a_node_may_advertise_only_its_own_peer_id():
    async def probe(url: str, version: int) -> Checked:
        return Checked(None, version)

    other = Identity.generate()
    d = RelayDirectory([], probe)
    assert not d.advertise(other.public_key, p2p_url(PEER))  # someone else's id: refused
    assert d.advertise(KEY.public_key, p2p_url(PEER))
    trio.run(d.check_all, 1)
    assert d.weights_urls(None) == [p2p_url(PEER)]
    # A node that then claims another's id is refused; its own URL stays as it was.
    assert not d.advertise(KEY.public_key, p2p_url(other.peer_id()))
    assert d.weights_urls(None) == [p2p_url(PEER)]


def test_nat_the_signed_peer_list_carries_bare_p2p_urls_only():
    pool = "pool"
    urls = ["http://a:1", p2p_url(PEER)]
    pl = open_peer_list(sign_peer_list(KEY, pool, urls, 1), public_key=KEY.public_key, pool_id=pool)
    assert pl.urls == urls
    bad = sign_peer_list(KEY, pool, [p2p_url(PEER) + "/x"], 2)
    with pytest.raises(PeerListError):
        open_peer_list(bad, public_key=KEY.public_key, pool_id=pool)


def test_nat_checking_a_stream_source_never_dials():
    """The coordinator reaches a node's stream source only over the connection the node holds
    to it: advertising one cannot make the coordinator open connections or circuits."""

    async def main():
        async with open_node(Identity.generate()) as prober, open_node(Identity.generate()) as n:
            prober.learn(n.peer_id, n.addrs)  # even a known address is not dialled
            async with probe_client(prober, 5.0) as http:
                r = await verify_source(p2p_url(n.peer_id), KEY.public_key, "p", 1, http=http)
            assert r.status is ProbeStatus.UNREACHABLE
            assert not prober.raw.get_network().connections

    trio.run(main)


def test_nat_the_coordinators_hop_serves_pool_nodes_in_good_standing_only(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    member, stranger, banned = Identity.generate(), Identity.generate(), Identity.generate()
    for node in (member, banned):
        ledger.join(node.public_key, peer_id_of(node.public_key), {}, "hf", 0.0)
    ledger.ban(banned.public_key, "test", None, 0.0)
    assert admitted_peer(ledger.is_active, member.peer_id())
    assert not admitted_peer(ledger.is_active, "not-a-peer-id")

    async def main():
        async with (
            Host.open(Identity.generate(), "pool") as coordinator,
            relay_hop(coordinator.libp2p, HopLimits(), ledger.is_active) as hop,
            open_node(member) as m,
            open_node(stranger) as s,
            open_node(banned) as b,
        ):
            assert hop is not None
            hop_addr = coordinator.addrs[0]
            assert (await m.reserve(hop_addr)).endswith(f"/p2p-circuit/p2p/{m.peer_id}")
            assert hop.holds_slot(m.peer_id) and not hop.holds_slot(s.peer_id)
            # A stream source without a slot is not handed out: fetchers could not reach it.
            async with probe_client(hop, 5.0) as http:
                found = await check_relay(
                    p2p_url(s.peer_id), 1, public_key=KEY.public_key, pool_id="pool", http=http,
                    hop=hop, timeout_s=5.0,
                )  # fmt: skip
            assert found.error == NO_SLOT
            for outsider in (s, b):
                with pytest.raises(TransportError):
                    await outsider.reserve(hop_addr)
                # Nor may an outsider reach the member through the hop.
                outsider.use_hops([hop_addr])
                with pytest.raises(TransportError):
                    await outsider.open_stream(m.peer_id, PROTOCOL_ID)

    trio.run(main)
    ledger.close()


def test_nat_without_the_hop_option_the_coordinator_runs_none():
    async def main():
        async with (
            Host.open(Identity.generate(), "p") as host,
            relay_hop(host.libp2p, None, bool) as hop,
        ):
            assert hop is None

    trio.run(main)


def test_nat_admission_is_by_public_key():
    seen: list[bytes] = []
    admit = partial(admitted_peer, lambda key: seen.append(key) or True)
    assert admit(PEER) and seen == [KEY.public_key]
