"""The coordinator's directory of advertised relays: a URL is a claim, handed out only after
a check passed, dropped when a later check fails."""

import time
from contextlib import asynccontextmanager

import httpx
import trio
from fastapi import FastAPI, Request, Response

import trainer.relays
from protocol.identity import Identity
from shardcast.origin import Origin
from shardcast.server import serve_app
from tests.shardcast.sc_helpers import POOL_ID, SHARD, make_checkpoint, nudge_checkpoint
from trainer.relays import (
    NOT_OWN_ADDRESS,
    UNREACHABLE_FOR_S,
    Checked,
    RelayDirectory,
    acceptable_url,
    check_relay,
    probe_client,
)


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


def test_a_node_is_told_its_relay_is_unreachable_only_after_a_minute_of_failed_checks():
    found = {"http://nat:1": Checked("unreachable")}

    async def probe(url: str, version: int) -> Checked:
        return found[url]

    async def main():
        d, node = RelayDirectory([], probe), b"n" * 32
        assert d.check_of(node, time.time()) == "none"  # no URL advertised
        d.advertise(node, "http://nat:1")
        assert d.check_of(node, time.time()) == "none"  # not checked yet
        await d.check_all(1)
        later = time.time() + UNREACHABLE_FOR_S + 1
        assert d.check_of(node, later) == "failed"  # one check is not a run of them
        await d.check_all(1)
        assert d.check_of(node, time.time()) == "failed"  # two, but within the minute
        assert d.check_of(node, later) == "unreachable"
        d.advertise(node, "http://nat:1")  # it joined again: serving now, by its word
        assert d.check_of(node, later) == "failed"
        for status in ("timeout", "unreachable"):  # nobody answering, either way
            found["http://nat:1"] = Checked(status)
            await d.check_all(1)
        assert d.check_of(node, later) == "unreachable"
        found["http://nat:1"] = Checked("bad_manifest")  # an answer, if a bad one
        await d.check_all(1)
        assert d.check_of(node, later) == "failed"
        found["http://nat:1"] = Checked(None, 1, 0)
        await d.check_all(1)
        assert d.check_of(node, later) == "ok"

    trio.run(main)


def test_only_plain_http_urls_of_bounded_length_are_probed():
    assert acceptable_url("http://127.0.0.1:8602") and acceptable_url("https://relay.example")
    assert not acceptable_url("ftp://relay.example") and not acceptable_url("http://")
    assert not acceptable_url("http://user:pw@relay.example") and not acceptable_url("h" * 300)
    assert acceptable_url("http://203.0.113.7:8602/") and acceptable_url("http://[2001:db8::1]:80")
    # nothing that would choose what the probe asks another server for
    for url in (
        "http://10.0.0.5/admin",
        "http://10.0.0.5/?x=",
        "http://10.0.0.5?x=",
        "http://10.0.0.5#",
        "http://10.0.0.5:99999",
    ):
        assert not acceptable_url(url), url


def test_a_relay_url_is_probed_only_at_the_address_its_node_connects_from():
    probed: list[str] = []

    async def probe(url: str, version: int) -> Checked:
        probed.append(url)
        return Checked(None, version, 0)

    async def main():
        d = RelayDirectory([], probe)
        seen = "203.0.113.7"
        cases = {
            b"a" * 32: "http://203.0.113.7:8602",  # its own: probed
            b"b" * 32: "http://[::ffff:203.0.113.7]:8602",  # the same, written as IPv6
            b"c" * 32: "http://127.0.0.1:8600",  # our loopback (the origin's port, say)
            b"d" * 32: "http://10.0.0.5:22",  # our private network
            b"e" * 32: "http://relay.example:8602",  # a name: it may resolve elsewhere later
        }
        for node, url in cases.items():
            assert d.advertise(node, url, seen_at=seen)
        d.advertise(b"f" * 32, "http://10.0.0.6:1")  # no transport to say (handlers in a test)
        d.advertise(b"g" * 32, "http://10.0.0.7:1", seen_at="")  # it hung up after its join
        await d.check_all(1)
        assert sorted(probed) == sorted([cases[b"a" * 32], cases[b"b" * 32], "http://10.0.0.6:1"])
        urls = d.weights_urls(None)
        assert all(cases[k] not in urls for k in (b"c" * 32, b"d" * 32, b"e" * 32))
        refused = {r.node for r in d.statuses() if r.error == NOT_OWN_ADDRESS}
        assert refused == {(k * 32).hex() for k in (b"c", b"d", b"e", b"g")}
        # the node is told at once: nobody it would be handed to can count on that address
        assert d.check_of(b"d" * 32, time.time()) == "refused"
        assert d.check_of(b"a" * 32, time.time()) == "ok"

    trio.run(main)


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


def test_joining_again_with_other_urls_buys_no_checks():
    # Each new URL used to start a round of checks of every relay: one member re-joining 20
    # times a second, alternating two ports, had every honest relay checked 73 times in 10 s.
    probed: list[str] = []

    async def probe(url: str, version: int) -> Checked:
        probed.append(url)
        return Checked(None, version, 0)

    async def main():
        d = RelayDirectory([], probe, recheck_s=30.0)
        d.advertise(b"h" * 32, "http://honest:1")
        d.advertise(b"m" * 32, "http://mallory:1")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(d.check_forever, lambda: 1, lambda urls: None)
            await trio.sleep(0.05)
            for i in range(200):
                d.advertise(b"m" * 32, f"http://mallory:{2 + i % 2}")
                await trio.sleep(0.002)
            d.advertise(b"n" * 32, "http://newcomer:1")  # a new node's first URL: at once
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
        assert sorted(probed) == ["http://honest:1", "http://mallory:1", "http://newcomer:1"]
        assert d.check_of(b"m" * 32, time.time()) == "none"  # its new URL waits for its turn

    trio.run(main)


def test_a_relay_that_failed_its_check_is_checked_again_soon(monkeypatch):
    # A relay checked before its seeder was ready waited a whole `recheck_s` to be handed out
    monkeypatch.setattr(trainer.relays, "RECHECK_FAILED_S", 0.05)
    found = iter([Checked("not_ready"), Checked("not_ready")])

    async def probe(url: str, version: int) -> Checked:
        return next(found, Checked(None, version, 0))

    async def main():
        d = RelayDirectory([], probe, recheck_s=30.0)
        d.advertise(b"a" * 32, "http://slow-start:1")
        with trio.move_on_after(1.0):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(d.check_forever, lambda: 1, lambda urls: None)
                while "http://slow-start:1" not in d.weights_urls(None):
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        assert d.weights_urls(None) == ["http://slow-start:1"]

    trio.run(main)


def test_a_full_directory_makes_room_only_from_relays_not_handed_out(monkeypatch):
    monkeypatch.setattr(trainer.relays, "MAX_NODE_RELAYS", 4)
    verdict = {"http://junk": Checked("not_held")}

    async def probe(url: str, version: int) -> Checked:
        return verdict.get(url.rsplit(":", 1)[0], Checked(None, version, 0))

    async def main():
        d = RelayDirectory([], probe)
        for i in range(4):
            assert d.advertise(bytes([i]) * 32, f"http://junk:{i}")
        await d.check_all(1)
        # free keys that advertised junk gave up their places, oldest first
        for i in range(4):
            assert d.advertise(bytes([10 + i]) * 32, f"http://good:{i}")
            assert bytes([i]) * 32 not in d._relays
        await d.check_all(1)
        assert len(d.weights_urls(None)) == 4
        # every place is held by a relay handed out now: a newcomer waits for one to fail
        assert not d.advertise(b"z" * 32, "http://good:9")
        assert len(d.weights_urls(None)) == 4

    trio.run(main)


def test_verified_relays_past_the_list_take_turns_in_it(monkeypatch):
    monkeypatch.setattr(trainer.relays, "MAX_URLS_HANDED_OUT", 4)

    async def probe(url: str, version: int) -> Checked:
        return Checked(None, version, 0)

    async def main():
        d = RelayDirectory(["http://spec:1"], probe)
        for i in range(10):
            d.advertise(bytes([i]) * 32, f"http://relay:{i}")
        await d.check_all(1)
        lists = [d.weights_urls("http://origin:1") for _ in range(50)]
        assert all(u[:2] == ["http://origin:1", "http://spec:1"] and len(u) == 4 for u in lists)
        # the first two to pass do not hold both places: every relay is handed out in turn
        assert {url for u in lists for url in u[2:]} == {f"http://relay:{i}" for i in range(10)}

    trio.run(main)


def test_reports_of_where_weights_came_from_are_kept_for_the_latest_reporters(monkeypatch):
    monkeypatch.setattr(trainer.relays, "MAX_SOURCE_REPORTS", 3)
    d = RelayDirectory([], None)
    for i in range(5):
        d.note_sources(bytes([i]) * 32, {"http://origin": i})
    d.note_sources(bytes([2]) * 32, {"http://origin": 7})  # reported again: the latest now
    d.note_sources(bytes([5]) * 32, {})
    assert [k[0] for k in d._sources] == [4, 2, 5]
    assert d.sources(bytes([2]) * 32) == {"http://origin": 7} and d.sources(b"\0" * 32) == {}


def test_a_relay_still_mirroring_the_newest_version_is_judged_on_the_one_before(tmp_path):
    """A real origin with v1 and v2 behind a relay that holds v2's manifest but answers 503
    for its shards (still mirroring): verified on v1. One that is not ready for either
    version fails its check."""

    async def main():
        async with _mirroring_relay(tmp_path) as (url, ready, _):
            assert (await _check(url)).error == "not_ready"
            ready.add(1)
            found = await _check(url)
            assert (found.error, found.version, found.served) == (None, 1, None)
            ready.add(2)
            assert (await _check(url)).version == 2

    trio.run(main)


def test_a_relay_not_ready_for_the_newest_cannot_pass_on_a_bad_or_slow_older_one(tmp_path):
    """The fallback to the version before is no way in: a relay not ready for v2 that serves
    v1's shard with flipped bytes fails as bad_shard, and one that stalls or falls silent on
    v1 fails as a timeout; the whole check stays within the two versions' deadlines."""

    async def main():
        async with _mirroring_relay(tmp_path) as (url, _, faults):
            for fault, error in [
                ("flip", "bad_shard"),
                ("stall", "timeout"),
                ("silent", "timeout"),
            ]:
                faults[1] = fault
                start = trio.current_time()
                assert (await _check(url, timeout_s=1.0)).error == error, fault
                assert trio.current_time() - start < 2 * 1.0 + 1.0, fault

    trio.run(main)


KEY = Identity(bytes(range(32)))


async def _check(url: str, timeout_s: float = 5.0) -> Checked:
    async with probe_client(None, timeout_s) as http:
        return await check_relay(
            url, 2, public_key=KEY.public_key, pool_id=POOL_ID, http=http, hop=None,
            timeout_s=timeout_s,
        )  # fmt: skip


@asynccontextmanager
async def _mirroring_relay(tmp_path):
    """A relay in front of a real origin holding v1 and v2: it serves every manifest, a
    version's shards only once it is in `ready` (503 before: still mirroring), and a version
    in `faults` with that fault: "flip" (its shard bytes inverted), "stall" (the shard's
    answer 30 s late), "silent" (the manifest's answer 30 s late)."""
    origin = Origin(tmp_path / "o", KEY, POOL_ID, shard_size=SHARD)
    ready: set[int] = set()
    faults: dict[int, str] = {}
    upstream: list[str] = []
    relay = FastAPI()

    @relay.get("/v/{version}/{rest:path}")
    async def forward(version: int, rest: str, request: Request) -> Response:
        fault = faults.get(version)
        if fault == "silent" or (fault == "stall" and rest != "manifest"):
            await trio.sleep(30)
        if rest != "manifest" and version not in ready and fault is None:
            return Response(status_code=503)
        headers = {k: v for k, v in request.headers.items() if k.lower() == "range"}
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{upstream[0]}/v/{version}/{rest}", headers=headers)
        body = (
            bytes(b ^ 0xFF for b in r.content)
            if fault == "flip" and rest != "manifest"
            else r.content
        )
        return Response(body, status_code=r.status_code)

    ck = make_checkpoint(tmp_path / "ck", mb=0.2)
    async with trio.open_nursery() as nursery:
        upstream.append(await nursery.start(origin.serve))
        url = await nursery.start(serve_app, relay, "127.0.0.1", 0)
        await origin.publish(ck, 1)
        nudge_checkpoint(ck, seed=2)
        await origin.publish(ck, 2)
        yield url, ready, faults
        nursery.cancel_scope.cancel()
