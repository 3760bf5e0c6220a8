"""bench/shardcast_trace.py reads what a real fetch logs (the members' log format, from
`protocol.logs`), so a change to the fetcher's log lines that the trace no longer reads shows
here rather than as an empty trace after a long benchmark."""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import replace

import httpx
import pytest
import trio
from sc_helpers import POOL_ID, REPO, SHARD, make_checkpoint
from test_sc_hostile import HOSTILE, fault_proxy

from protocol.logs import FORMAT
from shardcast.fetcher import ShardFetcher, Swarming, prepare_file, unit_jobs
from shardcast.origin import Origin
from shardcast.server import serve_app
from shardcast.sources import SourcePicker


def _trace_module(monkeypatch):
    """bench/shardcast_trace.py as a module (bench/ is scripts, not a package)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # for its shardcast_common
    path = REPO / "bench" / "shardcast_trace.py"
    spec = importlib.util.spec_from_file_location("shardcast_trace", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "shardcast_trace", module)  # its dataclass looks it up
    spec.loader.exec_module(module)
    return module


@pytest.mark.trio
async def test_the_trace_reads_a_fetchs_units_seed_copies_and_cuts(
    tmp_path, identity, monkeypatch
) -> None:
    """A member fetches from a peer that answers late (cut at the rate window: it has served
    nothing) and from the seed; the trace finds every unit, the seed's bytes, the cuts, and
    that the seed's copies followed them."""
    trace = _trace_module(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    handler = logging.FileHandler(run / "swarm2-n0.log")
    handler.setFormatter(logging.Formatter(FORMAT))
    loggers = [logging.getLogger(name) for name in ("shardcast.fetcher", "shardcast.swarm")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)  # not the attribute: setLevel clears the loggers' caches
    origin = Origin(tmp_path / "o", identity, POOL_ID, shard_size=SHARD)
    try:
        async with trio.open_nursery() as nursery, httpx.AsyncClient() as http:
            url = await nursery.start(origin.serve)
            m = await origin.publish(make_checkpoint(tmp_path / "ck", mb=0.1), 1)
            peer = await nursery.start(serve_app, fault_proxy([url], "late"), "127.0.0.1", 0)
            loggers[1].info("learnt peer %s", peer)  # as a member's watch logs a peer
            jobs = []
            for p in m.payload:
                prepare_file(tmp_path / "c" / p.name, p.size)
                jobs += unit_jobs(m, p, tmp_path / "c" / p.name)
            picker = SourcePicker([url, peer])
            swarm = Swarming(holders=lambda job: {peer}, seeds={url})
            policy = replace(HOSTILE, hedge_after=1e6, parallel=2)
            await ShardFetcher(http, picker, policy, swarm=swarm).fetch(1, jobs)
            nursery.cancel_scope.cancel()
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
        handler.close()
    units, cuts, peers = trace.read(run)
    assert peers == {peer}
    assert len(units) == len(jobs) and sum(u.nbytes for u in units) == sum(j.length for j in jobs)
    assert {u.source for u in units} == {url}  # every unit from the seed, after a cut
    r = trace.analyse(units, cuts, peers, rate=1e6)
    assert r["seed_bytes"] == sum(j.length for j in jobs)
    assert r["seed_extra_bytes"] == {}  # one member: no second copies
    assert sum(r["cuts"].values()) == len(cuts) >= 1
    assert all("below" in why for why in r["cuts"])
    assert trace.plot(r, 1e6, tmp_path / "trace.png")
    assert (tmp_path / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
