"""The coordinator's signed peer list: only a fresh, newer list signed by the pool's
coordinator for this pool is believed."""

from __future__ import annotations

from pathlib import Path

import httpx
import msgspec
import pytest
import trio
from sc_helpers import POOL_ID

from protocol.identity import Identity
from shardcast.origin import Origin
from shardcast.peerlist import (
    MAX_PEER_LIST_BYTES,
    PeerListError,
    PeerListHolder,
    open_peer_list,
    sign_peer_list,
)
from shardcast.relay import Relay
from shardcast.signed import Envelope

NOW = 1_000_000.0
URLS = ["http://10.0.0.1:8601", "http://10.0.0.2:8601/"]


def signed(identity: Identity, seq: int = 1, pool: str = "pool", **kw) -> bytes:
    return sign_peer_list(identity, pool, URLS, seq, now=kw.pop("now", NOW), **kw)


def test_a_signed_list_opens_with_its_urls(identity: Identity) -> None:
    pl = open_peer_list(signed(identity), public_key=identity.public_key, pool_id="pool", now=NOW)
    assert (pl.seq, pl.urls) == (1, ["http://10.0.0.1:8601", "http://10.0.0.2:8601"])


def _tampered(identity: Identity) -> bytes:
    env = msgspec.msgpack.decode(signed(identity), type=Envelope)
    body = env.body.replace(b"10.0.0.1", b"10.6.6.6")
    return msgspec.msgpack.encode(msgspec.structs.replace(env, body=body))


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda me: signed(Identity.generate()), "not by the pool's coordinator"),
        (_tampered, "signature does not verify"),
        (lambda me: signed(me, pool="other"), "for pool 'other'"),
        (lambda me: signed(me, now=NOW - 700), "expired"),
        (lambda me: signed(me, now=NOW + 60), "in the future"),
        (lambda me: b"\x00" * 64, "malformed"),
        (lambda me: b"\x00" * (MAX_PEER_LIST_BYTES + 1), "exceeds"),
    ],
)
def test_bad_lists_are_refused(identity: Identity, make, error: str) -> None:
    with pytest.raises(PeerListError, match=error):
        open_peer_list(make(identity), public_key=identity.public_key, pool_id="pool", now=NOW)


def test_a_holder_keeps_the_newest_and_refuses_replays(identity: Identity) -> None:
    holder = PeerListHolder(identity.public_key, "pool")
    second = signed(identity, seq=2)
    holder.offer(second, now=NOW)
    with pytest.raises(PeerListError, match="not newer"):
        holder.offer(signed(identity, seq=1), now=NOW)
    with pytest.raises(PeerListError, match="not by the pool's coordinator"):
        holder.offer(signed(Identity.generate(), seq=3), now=NOW)
    assert holder.raw == second and len(holder.urls(now=NOW)) == 2
    assert holder.urls(now=NOW + 601) == []  # expired lists vouch for nothing


@pytest.mark.trio
async def test_a_member_learns_the_coordinators_list_and_re_serves_it(
    tmp_path: Path, identity: Identity
) -> None:
    origin = Origin(tmp_path / "o", identity, POOL_ID)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(origin.serve)
        member = Relay(
            [url],
            tmp_path / "m",
            public_key=identity.public_key,
            pool_id=POOL_ID,
            identity=Identity.generate(),
        )
        m_url = await nursery.start(member.run)
        data = origin.publish_peers(["http://10.9.9.9:8601"])
        with trio.fail_after(15):
            while "http://10.9.9.9:8601" not in member.picker.stats:
                await trio.sleep(0.1)
        async with httpx.AsyncClient(timeout=5) as http:
            assert (await http.get(f"{m_url}/peerlist")).content == data
        assert "http://10.9.9.9:8601" in member.watch.peers()
        nursery.cancel_scope.cancel()
