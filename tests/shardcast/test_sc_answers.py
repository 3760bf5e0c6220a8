"""Malformed and lying JSON answers from peers and upstreams, over real servers on loopback.

A peer's answer is decoded into the shape its endpoint has (`shardcast.answers`); anything
else is one `BadAnswer`, a fault of that peer. Before, a few bytes ended a member's
`Relay.run`: `"changes": Infinity` in a `/have` answer (OverflowError from `int()`), or
nested brackets in a `/peers` or `/versions` answer (RecursionError from the parser).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
from fastapi import FastAPI
from fastapi.responses import Response
from sc_helpers import POOL_ID, SHARD, make_checkpoint

from protocol.identity import Identity
from shardcast.answers import HAVE, LISTING, MAX_VERSION, PEERS, decode
from shardcast.client import fetch_manifest
from shardcast.errors import BadAnswer, FetchError
from shardcast.origin import Origin
from shardcast.peers import announce
from shardcast.relay import Relay
from shardcast.server import serve_app
from shardcast.sources import SourcePicker

NESTED = b"[" * 5000 + b"]" * 5000


@pytest.mark.parametrize(
    ("decoder", "body"),
    [
        (HAVE, b'{"bits": "ff", "changes": Infinity}'),
        (HAVE, b'{"bits": "ff", "changes": 1e999}'),
        (HAVE, b'{"bits": "ff", "changes": -1}'),
        (HAVE, b'{"bits": "ff", "changes": true}'),
        (HAVE, b'{"bits": ' + NESTED + b"}"),
        (PEERS, b'{"peers": [' + NESTED + b"]}"),
        (LISTING, b'{"versions": [' + NESTED + b"]}"),
        (LISTING, b'{"versions": [{"version": true}]}'),
        (LISTING, b'{"versions": [{"version": -1}]}'),
        (LISTING, b'{"versions": [{"version": %d}]}' % (MAX_VERSION + 1)),
        (LISTING, b'{"versions": [{"version": 1, "base": 1.5}]}'),
    ],
)
def test_a_malformed_answer_is_one_typed_error(decoder, body: bytes) -> None:
    with pytest.raises(BadAnswer):
        decode(decoder, body)


def _hostile_peer(upstream: str, answered: list[str]) -> FastAPI:
    """A member that answers `/peers` with nested brackets and `/have` with its upstream's
    bitfield but `"changes": Infinity`; each answer's path is appended to `answered`."""
    app = FastAPI()

    async def forward(path: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=10) as http:
            return await http.get(f"{upstream}{path}")

    @app.get("/peers")
    async def peers() -> Response:
        answered.append("/peers")
        return Response(b'{"peers":[' + NESTED + b"]}", media_type="application/json")

    @app.get("/v/{version}/have")
    async def have(version: str) -> Response:
        r = await forward(f"/v/{version}/have")
        if r.status_code != 200:
            return Response(status_code=r.status_code)
        body = json.dumps({**r.json(), "changes": float("inf")})  # ..."changes": Infinity
        answered.append("/have")
        return Response(body, media_type="application/json")

    return app


@pytest.mark.trio
async def test_a_peers_malformed_answers_never_end_a_members_run(
    tmp_path: Path, identity: Identity
) -> None:
    origin = Origin(tmp_path / "o", identity, POOL_ID, shard_size=SHARD)
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=10) as http:
        url = await nursery.start(origin.serve)
        answered: list[str] = []
        bad = await nursery.start(serve_app, _hostile_peer(url, answered), "127.0.0.1", 0)
        await http.post(f"{url}/peers", content=announce(Identity.generate(), POOL_ID, bad))
        member = Relay(
            [url],
            tmp_path / "m",
            public_key=identity.public_key,
            pool_id=POOL_ID,
            identity=Identity.generate(),
            poll_wait=1,
        )
        ended: list[BaseException] = []

        async def run_member() -> None:
            try:
                await member.run()
            except Exception as e:  # what the test looks for: the run must not end
                ended.append(e)

        async def until(done: Callable[[], object]) -> None:
            while not done():
                assert not ended, ended
                await trio.sleep(0.1)

        nursery.start_soon(run_member)
        with trio.fail_after(20):
            await until(lambda: bad in member.picker.stats and "/peers" in answered)
            await origin.publish(make_checkpoint(tmp_path / "ck", mb=0.5), 1, delta=False)
            await until(lambda: (sv := member.store.get(1)) is not None and sv.complete)
        assert "/have" in answered
        await trio.sleep(1.0)  # for the answers in flight to be read
        assert not ended
        nursery.cancel_scope.cancel()


def _liar(upstream: str, asked: list[int]) -> FastAPI:
    """An upstream that lists, beside its upstream's versions, a new one past the largest a
    server answers for on each call (and a boolean), and holds none of them."""
    app = FastAPI()

    @app.get("/versions")
    async def versions() -> dict:
        async with httpx.AsyncClient(timeout=10) as http:
            listing = (await http.get(f"{upstream}/versions")).json()
        asked.append(1)
        fake = [{"version": MAX_VERSION + len(asked)}, {"version": True}]
        return {**listing, "versions": listing["versions"] + fake}

    return app


@pytest.mark.trio
async def test_a_version_no_server_serves_costs_honest_sources_nothing(
    tmp_path: Path, identity: Identity
) -> None:
    """A liar listed versions past 18 digits; honest servers answer 400 for those, and each
    400 was scored as a bad manifest: three of them banned the origin for good at every
    member that followed the liar. Such a listing is refused, and a 400 is no corruption."""
    origin = Origin(tmp_path / "o", identity, POOL_ID, shard_size=SHARD)
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=10) as http:
        url = await nursery.start(origin.serve)
        await origin.publish(make_checkpoint(tmp_path / "ck", mb=0.2), 1, delta=False)
        picker = SourcePicker([url])
        with pytest.raises(FetchError):
            await fetch_manifest(
                http, picker, MAX_VERSION + 1, public_key=identity.public_key, pool_id=POOL_ID
            )
        assert (picker.stats[url].corrupt, picker.stats[url].failed) == (0, 1)
        asked: list[int] = []
        liar = await nursery.start(serve_app, _liar(url, asked), "127.0.0.1", 0)
        member = Relay(
            [url, liar],
            tmp_path / "m",
            public_key=identity.public_key,
            pool_id=POOL_ID,
            identity=Identity.generate(),
            poll_wait=1,
        )
        await nursery.start(member.run)
        with trio.fail_after(20):
            while len(asked) < 3 or not (sv := member.store.get(1)) or not sv.complete:
                await trio.sleep(0.1)
        assert member.picker.stats[url].corrupt == 0
        assert not member.abandoned  # no fake version was tried
        nursery.cancel_scope.cancel()
