"""A relay's view of its peers: gossip of who serves, and which shards each one holds.

A swarm member is a `Relay` given an identity (see relay.py): it mirrors each version from
its upstreams (seeds: the origin, relays) *and* from its peers (other members), and serves
what it holds. `PeerWatch` keeps that going:

- **Gossip** (`run`): every `GOSSIP_EVERY` seconds it pushes this member's signed
  announcement to its upstreams and a few peers (`POST /peers`) and pulls theirs
  (`GET /peers`); every announcement that checks out makes its URL a source. A late joiner
  therefore learns the swarm from its first pull of the origin.
- **Bitfields** (`watch`): while a version is mirrored, one long-poll per active peer on
  `GET /v/{N}/have` tells which shards that peer holds; the fetcher takes the rarest
  first and asks a peer that holds it. At most `max_peers` peers are watched at once
  (those not dropped by the picker for bad bytes, stalls or lies), so the cost per member
  stays bounded however large the swarm.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable

import httpx
import numpy as np
import trio

from protocol.identity import Identity
from shardcast.fetcher import ResponseTooLarge, ShardJob, get_capped
from shardcast.manifest import Manifest
from shardcast.peers import PeerTable, announce
from shardcast.sources import SourcePicker

log = logging.getLogger(__name__)

GOSSIP_EVERY = 2.0
GOSSIP_FANOUT = 3  # peers pushed to and pulled from per round, besides the upstreams
HAVE_WAIT = 10.0  # long-poll of a peer's bitfield
WATCH_REFRESH = 1.0  # how often the set of watched peers is revisited
MAX_PEERS_BYTES = 256 * 1024
MAX_HAVE_BYTES = 1024 * 1024
REQUEST_TIMEOUT = 10.0


class PeerWatch:
    def __init__(
        self,
        http: httpx.AsyncClient,
        table: PeerTable,
        picker: SourcePicker,
        upstreams: list[str],
        identity: Identity,
        max_peers: int = 8,
    ) -> None:
        self.http = http
        self.table = table
        self.picker = picker
        self.upstreams = upstreams
        self.identity = identity
        self.max_peers = max_peers
        self.own_url: str | None = None
        # version -> peer url -> set of global shard indices it holds (its latest bitfield)
        self._have: dict[int, dict[str, set[int]]] = {}

    def peers(self) -> list[str]:
        return [u for u in self.table.urls() if u != self.own_url and u not in self.upstreams]

    # -- gossip ------------------------------------------------------------------------------

    async def run(self, own_url: str) -> None:
        """Announce `own_url` and learn peers, until cancelled."""
        self.own_url = own_url.rstrip("/")
        while True:
            targets = self.upstreams + random.sample(
                self.peers(), min(GOSSIP_FANOUT, len(self.peers()))
            )
            mine = announce(self.identity, self.table.pool_id, self.own_url)
            async with trio.open_nursery() as nursery:
                for url in targets:
                    nursery.start_soon(self._exchange, url, mine)
            await trio.sleep(GOSSIP_EVERY * random.uniform(0.8, 1.2))

    async def _exchange(self, url: str, mine: bytes) -> None:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                await self.http.post(f"{url}/peers", content=mine)
                status, body = await get_capped(self.http, f"{url}/peers", MAX_PEERS_BYTES)
            if status != 200:
                return
            items = json.loads(body).get("peers", [])
        except (httpx.HTTPError, trio.TooSlowError, ValueError, ResponseTooLarge, AttributeError):
            return  # a peer that cannot gossip is simply not heard
        for item in items[:64] if isinstance(items, list) else []:
            a = self.table.add(json.dumps(item).encode())
            if a is not None and a.url != self.own_url and self.picker.add(a.url):
                log.info("learnt peer %s", a.url)

    # -- bitfields ---------------------------------------------------------------------------

    def holders(self, version: int, index: int) -> set[str]:
        have = self._have.get(version, {})
        return {u for u, held in have.items() if index in held}

    async def watch(self, version: int, m: Manifest) -> None:
        """Follow the bitfields of up to `max_peers` usable peers while `version` is
        mirrored (until cancelled)."""
        self._have[version] = {}
        total = sum(len(p.shards) for p in m.payload)
        watched: dict[str, trio.CancelScope] = {}
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    for url, scope in list(watched.items()):
                        if self.picker.dropped(url, version):
                            scope.cancel()  # bad bytes, stalls or lies: not asked again
                            del watched[url]
                            self._have[version].pop(url, None)
                    fresh = [
                        u
                        for u in self.peers()
                        if u not in watched and not self.picker.dropped(u, version)
                    ]
                    random.shuffle(fresh)
                    for url in fresh[: self.max_peers - len(watched)]:
                        watched[url] = trio.CancelScope()
                        nursery.start_soon(self._follow_have, version, url, total, watched[url])
                    await trio.sleep(WATCH_REFRESH)
        finally:
            self._have.pop(version, None)

    async def _follow_have(
        self, version: int, url: str, total: int, scope: trio.CancelScope
    ) -> None:
        held = -1
        failures = 0
        with scope:
            while held < total and failures < 3:
                try:
                    with trio.fail_after(HAVE_WAIT + REQUEST_TIMEOUT):
                        status, body = await get_capped(
                            self.http,
                            f"{url}/v/{version}/have",
                            MAX_HAVE_BYTES,
                            {"after": held, "wait": HAVE_WAIT},
                        )
                    if status == 404:  # not mirroring it (yet): ask again later
                        await trio.sleep(WATCH_REFRESH)
                        continue
                    if status != 200:
                        raise ValueError(f"HTTP {status}")
                    data = json.loads(body)
                    bits = _bits(str(data["bits"]), total)
                    held = len(bits)
                    failures = 0
                    if version in self._have:
                        self._have[version][url] = bits
                except (httpx.HTTPError, trio.TooSlowError, ValueError, KeyError, TypeError):
                    failures += 1
                    await trio.sleep(WATCH_REFRESH)
                except ResponseTooLarge:
                    return


def _bits(hexbits: str, total: int) -> set[int]:
    """Shard indices set in a peer's hex bitfield (MSB first); ValueError if malformed."""
    if len(hexbits) != 2 * (-(-total // 8)):
        raise ValueError("bitfield of the wrong length")
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(hexbits), dtype=np.uint8))[:total]
    return set(np.flatnonzero(bits).tolist())


def shard_index(m: Manifest) -> dict[str, int]:
    """Global index of each payload file's first shard, as in bitfields."""
    out, n = {}, 0
    for p in m.payload:
        out[p.name] = n
        n += len(p.shards)
    return out


def job_holders(watch: PeerWatch, version: int, m: Manifest) -> Callable[[ShardJob], set[str]]:
    """For the fetcher: the peers holding a job's shard of `version`."""
    first = shard_index(m)

    def holders(job: ShardJob) -> set[str]:
        return watch.holders(version, first[job.name] + job.index)

    return holders
