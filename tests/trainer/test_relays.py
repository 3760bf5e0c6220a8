"""The coordinator's directory of advertised relays: a URL is a claim, handed out only after
a check passed, dropped when a later check fails."""

import trio

from trainer.relays import Checked, RelayDirectory, acceptable_url


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
