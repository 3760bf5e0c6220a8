"""Swarm members as real processes: a late joiner fetches from its peers, not the origin,
and a peer that serves bad bytes is caught and dropped."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import deque
from pathlib import Path

import httpx
import pytest
from sc_helpers import REPO, SHARD, make_checkpoint
from test_sc_processes import HELPERS, pool_file, publish, start_origin, wait_listed

from protocol.identity import Identity
from shardcast.peers import MAX_PEERS, MAX_SKEW, TTL, PeerTable, announce

LOCAL = "http://127.0.0.1:9"
"""The pool's source in the unit tests: a pool on one machine follows any gossiped URL
(`shardcast.scope`), here names that the mock transports route by."""


def start_seed(procs, tmp_path: Path, name: str, pid: str, key: str, upstream: str, *extra):
    p = procs(
        "--upstream", upstream, "--root", str(tmp_path / name), "--pool-id", pid,
        "--public-key", key, *extra, module="shardcast.seed",
    )  # fmt: skip
    return p, p.announcement()["url"]


def payload_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_late_joiner_fetches_from_peers_and_drops_a_corrupting_one(
    tmp_path, identity, key_file, procs
) -> None:
    pool, pid = pool_file(tmp_path, identity)
    key = identity.public_key.hex()
    ck = make_checkpoint(tmp_path / "ck", mb=2)
    # The origin is slower than the peers: with equal rates the late joiner could finish from
    # the origin alone before it had heard of any peer (seen once in CI on 2 busy cores).
    origin = start_origin(procs, tmp_path, key_file, pool, "--rate-mb", "0.5")
    # Honest peers are slower than the liar, so the late joiner is sure to try the liar.
    a, a_url = start_seed(procs, tmp_path, "a", pid, key, origin, "--rate-mb", "2")
    b, b_url = start_seed(procs, tmp_path, "b", pid, key, origin, "--rate-mb", "2")
    publish(key_file, pool, tmp_path / "origin", ck, 1)
    for p in (a, b):
        assert p.announcement(60)["version"] == 1
    evil = subprocess.Popen(
        [sys.executable, str(HELPERS / "evil_seed.py"), origin, str(tmp_path / "evil"), pid,
         key, str(SHARD)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
        env={"PYTHONPATH": f"{REPO}:{HELPERS}", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    try:
        evil_url = json.loads(evil.stdout.readline())["url"]
        wait_listed(evil_url, 1, timeout=60)
        # The origin has heard of all three peers by gossip.
        known = {p["url"] for p in httpx.get(f"{origin}/peers", timeout=5).json()["peers"]}
        assert {a_url, b_url} <= known
        c, _ = start_seed(procs, tmp_path, "c", pid, key, origin, "--log-level", "INFO")
        done = c.announcement(90)
    finally:
        evil.kill()
        evil.wait()
    assert done["version"] == 1, c.stderr()
    got = payload_files(tmp_path / "c" / "v1" / "payload")
    assert got == payload_files(tmp_path / "origin" / "v1" / "payload")
    by_source = done["bytes_by_source"]
    total = sum(len(v) for v in got.values())
    from_peers = by_source.get(a_url, 0) + by_source.get(b_url, 0)
    assert from_peers >= total / 2, by_source
    assert evil_url in done["bad_sources"]


def test_announcements_are_signed_fresh_and_for_this_pool() -> None:
    me, other = Identity.generate(), Identity.generate()
    table = PeerTable("pool", own_key=me.public_key)
    now = 1_000_000.0
    good = announce(other, "pool", "http://127.0.0.1:9000", now)
    assert table.add(good, now) is not None
    assert table.urls(now) == ["http://127.0.0.1:9000"]
    assert table.add(good, now) is None  # a replay adds nothing
    assert table.add(announce(me, "pool", "http://127.0.0.1:1", now), now) is None  # ourselves
    assert table.add(announce(other, "other", "http://127.0.0.1:1", now), now) is None
    assert table.add(announce(other, "pool", "http://127.0.0.1:1", now - TTL - 1), now) is None
    assert table.add(announce(other, "pool", "http://127.0.0.1:1", now + 3600), now) is None
    assert table.add(announce(other, "pool", "file:///etc/passwd", now), now) is None
    forged = json.loads(announce(other, "pool", "http://127.0.0.1:1", now + 1))
    forged["url"] = "http://127.0.0.1:6666"
    assert table.add(json.dumps(forged).encode(), now) is None
    assert table.urls(now + TTL + 1) == []  # expired


def test_one_host_dating_its_announcements_ahead_locks_no_member_out_of_a_table() -> None:
    """Keys are free: 256 announcements from one host dated `MAX_SKEW` ahead outranked every
    honest one, and each honest re-announcement was evicted by the add that took it. A URL
    with userinfo made one socket as many URLs."""
    table = PeerTable("pool")
    now = 1_000_000.0
    honest = [Identity.generate() for _ in range(20)]
    for i, key in enumerate(honest):
        assert table.add(announce(key, "pool", f"http://198.51.100.{i}:8600", now), now)
    ahead = now + MAX_SKEW - 1
    for port in range(1000, 1000 + MAX_PEERS):
        table.add(announce(Identity.generate(), "pool", f"http://203.0.113.7:{port}", ahead), now)
    later = now + 20  # every honest member re-announces, the attacker once more
    for i, key in enumerate(honest):
        assert table.add(announce(key, "pool", f"http://198.51.100.{i}:8600", later), later)
    table.add(announce(Identity.generate(), "pool", "http://203.0.113.7:999", later + 29), later)
    urls = table.urls(later)
    assert len(urls) == MAX_PEERS
    assert sum("198.51.100." in u for u in urls[:21]) == 20  # ranked as heard, not as dated
    assert sum("198.51.100." in u for u in urls) == 20
    userinfo = announce(Identity.generate(), "pool", "http://u1@198.51.100.1:8600", later)
    assert table.add(userinfo, later) is None


def test_bitfield_polls_quicken_as_a_member_nears_the_end():
    from shardcast.swarm import HAVE_MAX_GAP, HAVE_MIN_GAP, SMALL_VERSION, have_gap, not_yet_gap

    assert have_gap(100, 100) == HAVE_MAX_GAP == 0.5  # nothing held: batch a busy peer's changes
    assert have_gap(50, 100) == 0.125 and abs(have_gap(40, 100) - 0.08) < 1e-12  # 0.5 x share^2
    assert have_gap(20, 100) == have_gap(0, 100) == HAVE_MIN_GAP == 0.05  # the floor
    assert have_gap(150, 100) == HAVE_MAX_GAP  # a bad count never waits longer than that
    # A small version: asked again at once after news (a peer has news at most twice per unit).
    assert SMALL_VERSION == 16
    assert have_gap(16, 16) == have_gap(3, 3) == 0.0 and have_gap(17, 17) == HAVE_MAX_GAP
    # A peer not mirroring the version yet is asked again soon, then about once a second.
    assert [not_yet_gap(n) for n in range(6)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0]
    assert not_yet_gap(50) == 1.0


def test_a_member_in_a_swarm_keeps_one_seed_transfer_in_flight():
    from shardcast.fetcher import Swarming

    known = [1]
    swarm = Swarming(
        holders=lambda job: set(), seeds={"o"}, seed_parallel=3, members=lambda: known[0]
    )
    assert swarm.seed_slots() == 3  # alone: a second transfer hides a round trip
    known[0] = 8
    assert swarm.seed_slots() == 1  # 8 members x 3 would land 24 units together at the end


def _watch(
    handler, missing: int, seconds: float, total: int = 32, wakes: list | None = None
) -> tuple[int, int]:
    """(/have polls one member makes of a peer served by `handler`, peers it then counts as
    heard from) in `seconds` of trio's virtual time, through an in-memory transport, with
    `missing` of the version's `total` units still to come; each wake-up the fetch would get
    (`PeerWatch.listen`) is appended to `wakes`."""
    import trio
    import trio.testing

    from shardcast.sources import SourcePicker
    from shardcast.swarm import PeerWatch

    calls = []

    async def counted(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return await handler(len(calls))

    heard = []

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(counted)) as http:
            picker = SourcePicker([LOCAL])
            watch = PeerWatch(http, PeerTable("p"), picker, [LOCAL], Identity.generate())
            watch._have[1], watch._promised[1], watch._claims[1] = {}, {}, {}
            if wakes is not None:
                watch.listen(1, lambda: wakes.append(trio.current_time()))
            with trio.move_on_after(seconds):
                await watch._follow_have(
                    1, "http://peer", total, trio.CancelScope(), lambda: missing, None
                )
            heard.append(watch.answering(1))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return len(calls), heard[0]


def _polls(answer, missing: int, seconds: float, total: int = 32) -> int:
    """/have polls of a peer answering with `answer(n)` (n-th poll) at once."""

    async def handler(n: int) -> httpx.Response:
        body = json.dumps(answer(n)).encode()
        return httpx.Response(200, stream=httpx.ByteStream(body))  # read as a stream

    return _watch(handler, missing, seconds, total)[0]


def test_a_peer_answering_at_once_wakes_the_fetch_at_most_twice_per_unit():
    """A peer that answers every poll at once, each time claiming a unit it never claimed,
    first as being fetched and then as held, wakes this member's fetch workers once per new
    claim, at most 2 x 8 times for 8 units however long it keeps answering (here 8 + 7: it
    never claims the last unit held, so the watch goes on for the whole 600 s)."""

    def claims(n: int) -> dict:
        soon_n, held_n = min(n, 8), min(max(n - 8, 0), 7)  # 7 held: the watch goes on
        soon = ((1 << soon_n) - 1) << (8 - soon_n)
        held = ((1 << held_n) - 1) << (8 - held_n)
        return {"bits": f"{held:02x}", "soon": f"{soon:02x}", "changes": n}

    async def handler(n: int) -> httpx.Response:
        return httpx.Response(200, stream=httpx.ByteStream(json.dumps(claims(n)).encode()))

    wakes: list[float] = []
    polls, _ = _watch(handler, missing=8, seconds=600, total=8, wakes=wakes)
    assert len(wakes) == 8 + 7  # every new claim once; the repeats wake nothing
    assert polls <= 8 + 7 + 600 / 0.5 + 1  # then one poll per 0.5 s, as for any peer


def test_a_member_names_the_units_it_lacks_and_a_peer_answers_only_their_changes(tmp_path):
    """A peer's long-poll given `want` (the asker's missing units) answers a change to one
    of those only: near the end of a version most changes are to units the asker holds."""
    import trio
    import trio.testing

    from shardcast.sources import SourcePicker
    from shardcast.store import StoredVersion
    from shardcast.swarm import MAX_WANT_UNITS, PeerWatch

    wants = []

    async def peer(request: httpx.Request) -> httpx.Response:
        wants.append(request.url.params.get("want"))
        body = json.dumps({"bits": "00", "changes": len(wants)}).encode()
        return httpx.Response(200, stream=httpx.ByteStream(body))

    async def follow(total: int) -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(peer)) as http:
            seeds = [LOCAL]
            watch = PeerWatch(http, PeerTable("p"), SourcePicker(seeds), seeds, Identity.generate())
            watch._have[1], watch._promised[1], watch._claims[1] = {}, {}, {}
            with trio.move_on_after(1):
                await watch._follow_have(
                    1, "http://peer", total, trio.CancelScope(), lambda: 8, lambda: "00ff"
                )

    trio.run(follow, 16, clock=trio.testing.MockClock(autojump_threshold=0))
    assert wants and set(wants) == {"00ff"}
    # a version too large for its bitfield to fit a libp2p stream's request head: no `want`
    wants.clear()
    trio.run(follow, MAX_WANT_UNITS + 1, clock=trio.testing.MockClock(autojump_threshold=0))
    assert wants and set(wants) == {None}

    async def main() -> None:
        sv = StoredVersion(_manifest(16), b"", tmp_path, complete=False)
        assert sv.want_bitfield() == "ffff"
        want = sv.wanted_units("00ff")  # the asker holds units 0-7
        assert want.tolist() == list(range(8, 16))
        with trio.fail_after(1):
            await sv.wait_changes(-1, 60, want)  # a first poll is answered at once
        answered = []

        async def poll(seen: int, want) -> None:
            await sv.wait_changes(seen, 60, want)
            answered.append((seen, trio.current_time()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll, 0, want)
            nursery.start_soon(poll, 0, None)  # no `want`: any change
            await trio.sleep(1)
            sv.promise("w.bin", 3)
            sv.mark("w.bin", 5)  # changes to units the asker holds
            await trio.sleep(1)
            assert answered == [(0, 1.0)]  # only the poll without `want`
            sv.promise("w.bin", 9)
        assert answered == [(0, 1.0), (0, 2.0)]
        assert sv.want_bitfield() == "fbff"  # unit 5 is held now
        with trio.fail_after(1):
            await sv.wait_changes(2, 60, want)  # unit 9 changed after change 2: at once
        for bad in ("fff", "00ff00"):  # odd, or longer than the version's bitfield
            with pytest.raises(ValueError):
                sv.wanted_units(bad)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_silent_huge_and_lying_peers_are_given_up_and_never_counted():
    import trio

    async def silent(n: int) -> httpx.Response:
        await trio.sleep(3600)
        raise AssertionError("unreachable")

    async def huge(n: int) -> httpx.Response:
        return httpx.Response(200, stream=httpx.ByteStream(b"0" * (2 * 1024 * 1024)))

    async def lying(n: int) -> httpx.Response:  # a bitfield of the wrong length
        return httpx.Response(200, stream=httpx.ByteStream(b'{"bits": "ff", "changes": 1}'))

    # Each poll of a silent peer times out after 20 s; after 3 failures it is not asked again.
    assert _watch(silent, missing=1, seconds=600) == (3, 0)
    assert _watch(huge, missing=1, seconds=600) == (1, 0)  # over 1 MiB: dropped at once
    assert _watch(lying, missing=1, seconds=600) == (3, 0)
    # A peer that answers "not mirroring it yet" counts as heard from (one seed transfer).

    async def not_yet(n: int) -> httpx.Response:
        return httpx.Response(404, stream=httpx.ByteStream(b""))

    calls, heard = _watch(not_yet, missing=32, seconds=10.5)
    # asked again at t = 0.05, 0.15, 0.35, 0.75, then every second from 1.55 to 9.55
    assert heard == 1 and calls == 14


def test_a_peer_answering_at_once_with_nothing_new_is_polled_slowly():
    # 32 units, one byte per 8: "80" + zeros is unit 0 only.
    same = {"bits": "80" + "00" * 3, "changes": 1}
    # Near the end (1 unit missing) a first claim earns the short gap, a repeat the long one:
    # polls at t = 0, 0.05, 0.55, 1.05 and 1.55.
    assert _polls(lambda n: same, missing=1, seconds=2.0) == 5

    def growing(n: int) -> dict:
        held = min(n, 32)
        value = ((1 << held) - 1) << (32 - held)  # the first `held` units, MSB first
        return {"bits": f"{value:08x}", "changes": n}

    # Something new in every answer: one poll per 0.05 s, while the member lacks little.
    assert 19 <= _polls(growing, missing=1, seconds=1.0) <= 21
    # With every unit still missing, the gap is 0.5 s whatever the peer says: t = 0 ... 1.5.
    assert _polls(growing, missing=32, seconds=2.0) == 4


def test_a_small_version_is_asked_again_at_once_only_while_the_peer_has_news():
    """8 units: a peer that claims one more unit as being fetched in each answer is asked
    again at once, 8 times, then every 0.5 s once its claims stop being new (t = 0.5, 1, 1.5)."""

    def claims_one_more(n: int) -> dict:
        soon = ((1 << min(n, 8)) - 1) << (8 - min(n, 8))
        return {"bits": "00", "soon": f"{soon:02x}", "changes": n}

    assert _polls(claims_one_more, missing=8, seconds=1.9, total=8) == 8 + 1 + 3


def test_a_pushed_peer_becomes_a_source_and_a_banned_url_stays_banned_under_a_fresh_key():
    """`PeerWatch.learn`: an announcement that reached the table any way (here as a push to
    our server would: straight into the table) makes its URL a source. Bad bytes ban the URL;
    a fresh key announcing the same URL does not lift the ban, a new URL is a new source."""
    from shardcast.sources import SourcePicker
    from shardcast.swarm import PeerWatch

    table, picker = PeerTable("p"), SourcePicker([LOCAL])
    watch = PeerWatch(httpx.AsyncClient(), table, picker, [LOCAL], Identity.generate())
    assert table.add(announce(Identity.generate(), "p", "http://peer-a")) is not None
    assert picker.dropped("http://peer-a", 1)  # not a source until learnt
    watch.learn()
    assert not picker.dropped("http://peer-a", 1)
    for _ in range(picker.ban_after):
        picker.record_corrupt(picker.stats["http://peer-a"])
    fresh = Identity.generate()
    table.add(announce(fresh, "p", "http://peer-a"))
    table.add(announce(fresh, "p", "http://peer-b"))
    watch.learn()
    assert picker.dropped("http://peer-a", 1) and not picker.dropped("http://peer-b", 1)


def test_shares_are_dealt_only_to_peers_that_answer_and_do_their_part():
    """`PeerWatch.watch` over one version of 8 units, with three peers besides this member:
    one gone (every request fails), one that answers but never claims a unit, one that claims
    its share at once. The gone peer is out of the deal from its first failed request, the
    idle one once the grace is over (it cost that grace once), and the next version is dealt
    between this member and the working peer only."""
    import trio
    import trio.testing

    from shardcast.fetcher import SHARE_GRACE
    from shardcast.sources import SourcePicker
    from shardcast.swarm import PeerWatch

    total = 8
    m = _manifest(total)
    # sorted URLs: busy 0, gone 1, idle 2, me 3 -> busy's share is units 0 and 4
    share_of_busy = (1 << 7) | (1 << 3)

    async def handler(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host == "gone":
            raise httpx.ConnectError("connection refused", request=request)
        soon = share_of_busy if host == "busy" else 0
        body = json.dumps({"bits": "00", "soon": f"{soon:02x}", "changes": 1})
        return httpx.Response(200, stream=httpx.ByteStream(body.encode()))

    seen: dict[str, object] = {}

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            table = PeerTable("p")
            for url in ("http://busy", "http://gone", "http://idle"):
                table.add(announce(Identity.generate(), "p", url))
            watch = PeerWatch(http, table, SourcePicker([LOCAL]), [LOCAL], Identity.generate())
            watch.own_url = "http://me"
            watch.learn()
            watch.count_members()
            seen["before"] = list(watch._members)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch.watch, 1, m)
                await trio.sleep(1.5)
                seen["after a failed request"] = list(watch._members)
                await trio.sleep(SHARE_GRACE)
                seen["after the grace"] = list(watch._members)
                nursery.cancel_scope.cancel()
            watch.count_members()  # as the next version's fetch does
            seen["next version"] = (list(watch._members), watch.preferred(1))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert seen["before"] == ["http://busy", "http://gone", "http://idle", "http://me"]
    assert seen["after a failed request"] == ["http://busy", "http://idle", "http://me"]
    assert seen["after the grace"] == ["http://busy", "http://me"]
    # unit 1 is this member's share now (index mod 2 == its place, 1)
    assert seen["next version"] == (["http://busy", "http://me"], True)


def test_a_peer_that_lets_a_promise_lapse_is_not_waited_for_again():
    """A peer that says it is fetching every unit from a seed and never holds one: its first
    promise holds this member for `PROMISE_WAIT`, then it is believed no more, in that
    version and the next (it delayed this member once, not once per version)."""
    import trio
    import trio.testing

    from shardcast.sources import SourcePicker
    from shardcast.swarm import PROMISE_WAIT, PeerWatch

    liar = _claiming(soon="ff")  # fetching every unit, holding none

    seen: dict[str, bool] = {}

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(liar)) as http:
            table = PeerTable("p")
            table.add(announce(Identity.generate(), "p", "http://liar"))
            picker = SourcePicker([LOCAL])
            watch = PeerWatch(http, table, picker, [LOCAL], Identity.generate())
            watch.own_url = "http://me"
            watch.learn()
            for version in (1, 2):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch.watch, version, _manifest(8, version))
                    await trio.sleep(0.5)
                    seen[f"v{version} soon after"] = watch.promised(version, 3)
                    await trio.sleep(PROMISE_WAIT)
                    seen[f"v{version} after the wait"] = watch.promised(version, 3)
                    nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert seen == {
        "v1 soon after": True,
        "v1 after the wait": False,
        "v2 soon after": False,
        "v2 after the wait": False,
    }


def test_a_promise_is_waited_for_as_long_as_this_members_own_seed_transfers_take():
    """When the seed is slow for this member too (its own transfer of a unit has run 8 s), a
    peer's promise holds for twice that, not `PROMISE_WAIT`: at 32 members sharing a seed
    every honest promise lapsed at 5 s. The wait follows this member's own clock only, never
    passes `PROMISE_WAIT_MAX`, and a promise that outlives it still lapses for good."""
    import trio
    import trio.testing

    from shardcast.sources import SourcePicker
    from shardcast.swarm import PROMISE_WAIT, PROMISE_WAIT_MAX, PeerWatch

    slow_honest = _claiming(soon="10")  # fetching unit 3

    seen: dict[str, object] = {}

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(slow_honest)) as http:
            table = PeerTable("p")
            table.add(announce(Identity.generate(), "p", "http://peer"))
            watch = PeerWatch(http, table, SourcePicker([LOCAL]), [LOCAL], Identity.generate())
            watch.own_url = "http://me"
            watch.learn()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch.watch, 1, _manifest(8, 1))
                seen["alone"] = watch.promise_wait(1)
                watch.seed_fetch_started(1, 0)  # this member's own seed transfer of unit 0
                await trio.sleep(0.5)
                assert watch.promised(1, 3)
                await trio.sleep(PROMISE_WAIT + 2.5)  # 8 s into its own transfer
                seen["own transfer going"] = watch.promise_wait(1)
                seen["held past PROMISE_WAIT"] = watch.promised(1, 3)
                watch.unit_done(1, 0, won=True)  # it took 8 s
                seen["after it"] = watch.promise_wait(1)
                await trio.sleep(8.5)  # 16.5 s after the promise: past twice 8 s
                seen["held past twice that"] = watch.promised(1, 3)
                seen["after it lapsed"] = watch.promised(1, 3)
                watch.seed_fetch_started(1, 1)
                await trio.sleep(1000)
                seen["capped"] = watch.promise_wait(1)
                watch.unit_done(1, 1, won=False)  # lost: its time does not count
                seen["lost not counted"] = watch.promise_wait(1)
                nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert seen.pop("alone") == PROMISE_WAIT
    assert seen.pop("own transfer going") == pytest.approx(16.0, abs=0.01)
    assert seen.pop("after it") == pytest.approx(16.0, abs=0.01)
    assert seen.pop("capped") == PROMISE_WAIT_MAX
    assert seen.pop("lost not counted") == pytest.approx(16.0, abs=0.01)
    assert seen == {
        "held past PROMISE_WAIT": True,
        "held past twice that": False,
        "after it lapsed": False,
    }


def test_a_second_seed_transfer_at_the_first_picks_is_only_for_this_members_share():
    """Before any peer answered for the version a member keeps `seed_parallel` (2) seed
    transfers, but units are already dealt over the peers it knows of: the second transfer
    may take its own share, never a unit dealt to a peer it does not watch. Taking one let
    each of 32 members copy a unit already on its way at the start: 30 of the origin's 64
    transfers (docs/shardcast.md, thirtieth session)."""
    import trio
    import trio.testing

    from shardcast.fetcher import FetchPolicy, ShardFetcher, ShardJob
    from shardcast.sources import SourcePicker
    from shardcast.swarm import PeerWatch, swarming

    picked: list[object] = []

    async def main() -> None:
        table = PeerTable("p")
        for url in ("http://a", "http://b"):
            table.add(announce(Identity.generate(), "p", url))
        async with httpx.AsyncClient() as http:  # never used: nobody is asked anything
            picker = SourcePicker([LOCAL])
            watch = PeerWatch(http, table, picker, [LOCAL], Identity.generate(), max_peers=1)
            watch.own_url = "http://me"  # dealt over a, b, me: this member owns unit 2
            watch.learn()
            swarm = swarming(watch, 1, _manifest(3), {LOCAL}, 2, lambda job: None)
            fetcher = ShardFetcher(http, picker, FetchPolicy(), swarm=swarm)
            fetcher._started = fetcher._landed = trio.current_time()  # a fetch just begun
            queue = deque(
                ShardJob("w.bin", i, i * SHARD, SHARD, "0" * 64, Path("w")) for i in range(3)
            )
            assert (watch.answering(1), swarm.seed_slots()) == (0, 2)
            picked.append(fetcher._next_job(queue).index)
            picked.append(fetcher._next_job(queue))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert picked == [2, None]


def test_a_unit_only_busy_peers_hold_goes_after_units_a_less_busy_one_holds():
    """Rarest first, except that a unit whose every holder is sending `BUSY_QUEUE` streams or
    more (its last bitfield answer's claim plus our own transfers to it) waits behind units
    a less busy holder can start. Rarest first alone queued the members' workers 10-20 deep
    at the few peers holding units that had just landed, while 2-11 of 33 uploaders sent
    nothing (docs/shardcast.md, thirty-ninth session). Among holders, the one with the
    shortest queue is asked, at equal goodput."""
    import trio

    from shardcast.fetcher import BUSY_QUEUE, FetchPolicy, ShardFetcher, ShardJob, Swarming
    from shardcast.sources import MAX_STREAMS_BELIEVED, SourcePicker

    a, b, c = "http://a", "http://b", "http://c"
    holders = {0: {a}, 1: {b, c}, 2: {b}}
    picker = SourcePicker([LOCAL, a, b, c], explore=0.0)
    picker.note_streams(a, BUSY_QUEUE + 2)
    picker.note_streams("http://unknown", 3)  # a URL the picker does not know: ignored
    assert "http://unknown" not in picker.stats
    picker.note_streams(c, 10**9)
    assert picker.stats[c].streams == MAX_STREAMS_BELIEVED
    picker.note_streams(c, 0)
    picked: list[list[int]] = []

    async def main() -> None:
        swarm = Swarming(holders=lambda job: holders[job.index], seeds={LOCAL})
        fetcher = ShardFetcher(None, picker, FetchPolicy(), swarm=swarm)  # asks nobody
        fetcher._started = fetcher._landed = trio.current_time()

        def order() -> list[int]:
            queue = deque(
                ShardJob("w.bin", i, i * SHARD, SHARD, "0" * 64, Path("w")) for i in range(3)
            )
            return [fetcher._next_job(queue).index for _ in range(3)]

        picked.append(order())  # a is busy: its unit after the two that b and c can start
        picker.stats[b].inflight = 1
        picker.note_streams(b, BUSY_QUEUE - 1)  # ours and its claim: b is busy too
        picked.append(order())  # unit 1 (c is idle), then the rarest of the busy ones

    trio.run(main)
    assert picked[0] == [2, 1, 0]
    assert picked[1][0] == 1 and sorted(picked[1][1:]) == [0, 2]
    assert picker.pick(1, among={b, c}).url == c  # equal goodput: the shorter queue
    picker.stats[b].inflight = 0
    picker.note_streams(b, 0)
    picker.note_streams(c, 2)
    assert picker.pick(1, among={b, c}).url == b
    assert picker.pick_idle(1, avoid=set(), among={b, c}).url == b


def test_a_peer_s_claimed_streams_are_read_from_its_bitfield_answers():
    """The `streams` of a peer's `/have` answer becomes its `SourceStats.streams`; an answer
    without it (an older member) counts as none; a negative or non-integer count is a
    malformed answer, counted as a failed poll, and changes nothing."""
    answers = [{"bits": "00", "streams": 7}, {"bits": "00", "streams": -1}, {"bits": "00"}]
    seen: list[int] = []

    async def main() -> None:
        import trio

        from shardcast.sources import SourcePicker
        from shardcast.swarm import PeerWatch

        async def peer(request: httpx.Request) -> httpx.Response:
            body = json.dumps(answers[len(seen)]).encode()
            return httpx.Response(200, stream=httpx.ByteStream(body))

        async with httpx.AsyncClient(transport=httpx.MockTransport(peer)) as http:
            picker = SourcePicker([LOCAL, "http://peer"])
            watch = PeerWatch(http, PeerTable("p"), picker, [LOCAL], Identity.generate())
            watch._have[1], watch._promised[1], watch._claims[1] = {}, {}, {}
            picker.stats["http://peer"].streams = 5
            for _ in answers:
                with trio.move_on_after(0.01):  # one poll: the next waits a gap
                    await watch._follow_have(
                        1, "http://peer", 8, trio.CancelScope(), lambda: 8, None
                    )
                seen.append(picker.stats["http://peer"].streams)

    import trio
    import trio.testing

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert seen == [7, 7, 0]


def test_a_seed_is_held_to_the_rate_floor_only_where_a_peer_holds_the_unit():
    """The rate floor cuts a slow transfer only when another source could serve the unit.
    For a seed's unit that is a peer holding it, or another seed, not any peer: a seed that
    shares its upload fairly among more members than the floor allows (16 at 1 MB/s get
    62 KB/s each) was cut by every member, found at fault, and the version given up as
    having no source, over and over (docs/shardcast.md, thirty-first session). A peer that
    only the seed could replace is given `sole_holder_window` once it has served more units
    than it failed."""
    from shardcast.fetcher import FetchPolicy, ShardFetcher, ShardJob, Swarming
    from shardcast.sources import SourcePicker

    holders: set[str] = set()
    picker = SourcePicker([LOCAL, "http://peer", "http://other"])
    seed, peer, other = (picker.stats[u] for u in (LOCAL, "http://peer", "http://other"))
    swarm = Swarming(holders=lambda job: holders, seeds={LOCAL})
    policy = FetchPolicy()
    fetcher = ShardFetcher(httpx.AsyncClient(), picker, policy, swarm=swarm)
    job = ShardJob("w.bin", 0, 0, SHARD, "0" * 64, Path("w"))
    assert fetcher._floor_window(1, job, seed) is None  # no peer holds the unit
    holders.add("http://peer")
    assert fetcher._floor_window(1, job, seed) == policy.rate_window  # the peer could serve
    # Only the seed could replace the peer: a peer that has served nothing is cut as ever,
    assert fetcher._floor_window(1, job, peer) == policy.rate_window
    picker.record_success(peer, SHARD, 0.1)  # one that has is given time,
    assert fetcher._floor_window(1, job, peer) == policy.sole_holder_window
    picker.record_failure(peer)  # until it fails as often as it served;
    assert fetcher._floor_window(1, job, peer) == policy.rate_window
    picker.record_success(peer, SHARD, 0.1)
    holders.add("http://other")  # and a second holder could take over at once.
    assert fetcher._floor_window(1, job, peer) == policy.rate_window
    holders.discard("http://other")
    assert fetcher._floor_window(1, job, peer) == policy.sole_holder_window
    fetcher._patient = policy.parallel // 2  # but never for more than half the transfers
    assert fetcher._floor_window(1, job, peer) == policy.rate_window
    peer.corrupt = picker.ban_after
    assert fetcher._floor_window(1, job, seed) is None  # a banned holder is no alternative
    other.corrupt = picker.ban_after
    lone = ShardFetcher(httpx.AsyncClient(), picker, FetchPolicy())
    assert lone._floor_window(1, job, seed) is None  # no swarm: any usable source counts
    picker.add("http://relay")
    assert lone._floor_window(1, job, seed) == policy.rate_window
    picker.add("http://peer-under-a-fresh-key")  # back after its ban: it has served nothing
    holders.clear()
    holders.add("http://peer-under-a-fresh-key")
    fresh = picker.stats["http://peer-under-a-fresh-key"]
    assert fetcher._floor_window(1, job, fresh) == policy.rate_window


def test_only_a_share_dealt_to_a_watched_peer_is_waited_for():
    """With more peers than it watches, a member waits (during the grace) only for units
    dealt to the peers it watches: those it can see claiming them, or judge. Units dealt to
    the others, dead URLs among them, are taken like any unit."""
    import trio
    import trio.testing

    from shardcast.sources import SourcePicker
    from shardcast.swarm import PeerWatch

    m = _manifest(6)

    async def quiet(request: httpx.Request) -> httpx.Response:
        await trio.sleep(3600)  # a long-poll with nothing to tell
        raise AssertionError("unreachable")

    seen: dict[str, object] = {}

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(quiet)) as http:
            table = PeerTable("p")
            for url in ("http://a", "http://b"):
                table.add(announce(Identity.generate(), "p", url))
            picker = SourcePicker([LOCAL])
            watch = PeerWatch(http, table, picker, [LOCAL], Identity.generate(), max_peers=1)
            watch.own_url = "http://me"
            watch.learn()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch.watch, 1, m)
                await trio.sleep(0.1)
                seen["watched"] = set(watch._watched[1])
                seen["reserved"] = {u for u in range(6) if watch.reserved(1, u)}
                nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    # dealt over a, b, me (sorted): a owns 0 and 3, b owns 1 and 4, this member 2 and 5
    owned = {"http://a": {0, 3}, "http://b": {1, 4}}
    (watched,) = seen["watched"]
    assert seen["reserved"] == owned[watched]


def test_peers_that_never_answer_give_their_watch_slots_to_peers_that_do():
    """Ten announced URLs that refuse every connection and two live peers, with two watch
    slots: within a few watch rounds both slots follow the live peers, whatever the draw.
    A dead URL that failed is not drawn again for `UNREACHABLE_RETRY_S`."""
    from collections import Counter

    import trio
    import trio.testing

    from shardcast.sources import SourcePicker
    from shardcast.swarm import PeerWatch

    m = _manifest(4)
    asked: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.host)
        if request.url.host.startswith("dead"):
            raise httpx.ConnectError("connection refused", request=request)
        await trio.sleep(3600)  # a live peer long-polls with nothing new
        raise AssertionError("unreachable")

    seen: dict[str, set[str]] = {}

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            table = PeerTable("p")
            for url in [f"http://dead{i}" for i in range(10)] + ["http://live0", "http://live1"]:
                table.add(announce(Identity.generate(), "p", url))
            picker = SourcePicker([LOCAL])
            watch = PeerWatch(http, table, picker, [LOCAL], Identity.generate(), max_peers=2)
            watch.own_url = "http://me"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch.watch, 1, m)
                await trio.sleep(10.5)  # ten watch rounds, well inside the retry time
                seen["watched"] = set(watch._watched[1])
                nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert seen["watched"] == {"http://live0", "http://live1"}
    # each dead URL asked at most twice (its watch may retry once before the next round
    # drops it), and not drawn again within the retry time; the draw may well take both live
    # peers first and ask no dead one at all (CI saw it: 1 draw in 66)
    dead_asks = Counter(h for h in asked if h.startswith("dead"))
    assert all(n <= 2 for n in dead_asks.values()), dead_asks


def test_a_member_never_takes_its_own_urls_for_peers():
    """A node served over libp2p is in the pool's list as `p2p://peer/<its id>` while its
    seeder listens on HTTP. Learnt as a source before the node said it was its own (a list
    from its last run), that URL is forgotten once said; neither of its URLs is watched or
    announced (no table takes a `p2p://` announcement: the list vouches for it), and shares
    are dealt under the one the node said."""
    import trio
    import trio.testing

    from shardcast.p2p import p2p_url
    from shardcast.peerlist import PeerListHolder, sign_peer_list
    from shardcast.sources import SourcePicker
    from shardcast.swarm import OwnUrls, PeerWatch

    me = Identity.generate()
    mine_p2p, mine_http = p2p_url(me.peer_id()), "http://10.0.0.5:8001"
    coordinator = Identity.generate()
    asked: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        asked.append(f"{request.method} {request.url}")
        await trio.sleep(3600)  # peers long-poll with nothing new
        raise AssertionError("unreachable")

    seen: dict[str, object] = {}

    async def main() -> None:
        mock = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=mock, mounts={"p2p://": mock}) as http:
            table = PeerTable("p")
            table.add(announce(Identity.generate(), "p", "http://peer1"))
            listed = PeerListHolder(coordinator.public_key, "p")
            listed.offer(sign_peer_list(coordinator, "p", [mine_p2p], 1))
            picker = SourcePicker([LOCAL])
            own = OwnUrls()
            watch = PeerWatch(http, table, picker, [LOCAL], me, peer_list=listed, own=own)
            watch.learn()
            seen["sources before"] = sorted(picker.stats)
            own.announce(mine_p2p)  # what the node does once a hop gave it a slot
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch.run, mine_http)  # the seeder's own HTTP URL
                nursery.start_soon(watch.watch, 1, _manifest(4))
                await trio.sleep(5.5)
                seen["sources"] = sorted(picker.stats)
                seen["watched"] = sorted(watch._watched[1])
                seen["members"] = list(watch._members)
                nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert seen["sources before"] == [LOCAL, "http://peer1", mine_p2p]
    assert seen["sources"] == [LOCAL, "http://peer1"]
    assert seen["watched"] == ["http://peer1"]
    assert seen["members"] == sorted(["http://peer1", mine_p2p])
    assert not [u for u in asked if mine_p2p in u or mine_http in u], asked
    assert not [u for u in asked if u.startswith("POST")], asked
    assert f"GET {LOCAL}/peers" in asked  # it still hears the others


def _claiming(soon: str):
    """A peer's `/have` handler that holds nothing and claims to be fetching `soon` (hex)."""

    async def answer(request: httpx.Request) -> httpx.Response:
        body = json.dumps({"bits": "00", "soon": soon, "changes": 1})
        return httpx.Response(200, stream=httpx.ByteStream(body.encode()))

    return answer


def _manifest(units: int, version: int = 1):
    """A manifest of one raw payload file of `units` shards (the watch reads only its shape)."""
    from shardcast.manifest import Manifest, PayloadFile

    payload = PayloadFile(
        name="w.bin", target="w.bin", encoding="raw", size=units * SHARD,
        hash="00" * 32, shards=["00" * 32] * units,
    )  # fmt: skip
    return Manifest(pool_id="p", version=version, shard_size=SHARD, files=[], payload=[payload])
