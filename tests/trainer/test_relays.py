"""The coordinator's directory of advertised relays: a URL is a claim, handed out only after
a check passed, dropped when a later check fails."""

import httpx
import trio
from fastapi import Request

from protocol.identity import Identity
from trainer.relays import Checked, RelayDirectory, acceptable_url, check_relay, probe_client


def test_relays_are_handed_out_only_while_verified():
    verdicts = {"http://good:1": Checked(None, 3, 100), "http://liar:1": Checked("not_held")}

    async def probe(url: str, version: int) -> Checked:
        return verdicts[url]

    async def main():
        d = RelayDirectory(["http://spec:1"], probe)
        assert d.advertise(b"a" * 32, "http://good:1")
        assert d.advertise(b"b" * 32, "http://liar:1")
        assert not d.advertise(b"c" * 32, "file:///etc/passwd")
        # before any check only the origin and the operator's own relays go out
        assert d.weights_urls("http://origin:1") == ["http://origin:1", "http://spec:1"]
        await d.check_all(3)
        assert d.weights_urls("http://origin:1")[-1] == "http://good:1"
        assert "http://liar:1" not in d.weights_urls("http://origin:1")
        good = next(r for r in d.statuses() if r.url == "http://good:1")
        assert (good.verified, good.versions, good.served) == (True, [3], 100)
        verdicts["http://good:1"] = Checked("timeout")  # it starts to trickle
        await d.check_all(4)
        assert "http://good:1" not in d.weights_urls("http://origin:1")
        d.forget(b"a" * 32)  # banned: its relay and reports go
        assert all(r.url != "http://good:1" for r in d.statuses())

    trio.run(main)


def test_only_plain_http_urls_of_bounded_length_are_probed():
    assert acceptable_url("http://127.0.0.1:8602") and acceptable_url("https://relay.example/x")
    assert not acceptable_url("ftp://relay.example") and not acceptable_url("http://")
    assert not acceptable_url("http://user:pw@relay.example") and not acceptable_url("h" * 300)


def test_each_round_of_checks_signs_the_verified_relays_as_the_pools_peer_list(tmp_path):
    from protocol.identity import Identity
    from shardcast.origin import Origin
    from shardcast.peerlist import open_peer_list

    key = Identity.generate()
    origin = Origin(tmp_path / "o", key, "pool")
    verdicts = {"http://good:1": Checked(None, 3, 100), "http://liar:1": Checked("not_held")}

    async def probe(url: str, version: int) -> Checked:
        return verdicts[url]

    async def main():
        d = RelayDirectory([], probe, recheck_s=0.01)
        d.advertise(b"a" * 32, "http://good:1")
        d.advertise(b"b" * 32, "http://liar:1")
        signed: list[bytes] = []
        with trio.move_on_after(0.5):
            await d.check_forever(lambda: 3, lambda urls: signed.append(origin.publish_peers(urls)))
        assert signed
        peers = open_peer_list(signed[-1], public_key=key.public_key, pool_id="pool")
        assert peers.urls == ["http://good:1"]  # the liar failed its check

    trio.run(main)


def test_a_relay_still_mirroring_the_newest_version_is_judged_on_the_one_before(tmp_path):
    """A real origin with v1 and v2 behind a relay that holds v2's manifest but answers 503
    for its shards (still mirroring): verified on v1. One that is not ready for either
    version fails its check."""
    from fastapi import FastAPI, Response

    from shardcast.origin import Origin
    from shardcast.server import serve_app
    from tests.shardcast.sc_helpers import POOL_ID, SHARD, make_checkpoint, nudge_checkpoint

    key = Identity(bytes(range(32)))
    origin = Origin(tmp_path / "o", key, POOL_ID, shard_size=SHARD)
    ready: set[int] = set()
    upstream: list[str] = []
    relay = FastAPI()

    @relay.get("/v/{version}/{rest:path}")
    async def forward(version: int, rest: str, request: Request) -> Response:
        if rest != "manifest" and version not in ready:
            return Response(status_code=503)
        headers = {k: v for k, v in request.headers.items() if k.lower() == "range"}
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{upstream[0]}/v/{version}/{rest}", headers=headers)
        return Response(r.content, status_code=r.status_code)

    async def check(url: str) -> Checked:
        async with probe_client(None, 5.0) as http:
            return await check_relay(
                url, 2, public_key=key.public_key, pool_id=POOL_ID, http=http, hop=None,
                timeout_s=5.0,
            )  # fmt: skip

    async def main():
        ck = make_checkpoint(tmp_path / "ck", mb=0.2)
        async with trio.open_nursery() as nursery:
            upstream.append(await nursery.start(origin.serve))
            url = await nursery.start(serve_app, relay, "127.0.0.1", 0)
            await origin.publish(ck, 1)
            nudge_checkpoint(ck, seed=2)
            await origin.publish(ck, 2)
            assert (await check(url)).error == "not_ready"
            ready.add(1)
            found = await check(url)
            assert (found.error, found.version, found.served) == (None, 1, None)
            ready.add(2)
            assert (await check(url)).version == 2
            nursery.cancel_scope.cancel()

    trio.run(main)
