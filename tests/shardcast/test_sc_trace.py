"""bench/shardcast_trace.py reads what a real fetch logs (the members' log format, from
`protocol.logs`), so a change to the fetcher's log lines that the trace no longer reads shows
here rather than as an empty trace after a long benchmark."""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import replace

import pytest
from sc_helpers import REPO
from test_sc_hostile import HOSTILE, fetch_from_a_late_peer

from protocol.logs import FORMAT


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
    try:
        f = await fetch_from_a_late_peer(
            tmp_path, identity, replace(HOSTILE, hedge_after=1e6, parallel=2), False
        )
        loggers[1].info("learnt peer %s", f.peer)  # as a member's watch logs a peer
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
        handler.close()
    url, peer, jobs = f.seed, f.peer, f.jobs
    units, cuts, peers = trace.read(run)
    assert peers == {peer}
    assert len(units) == len(jobs) and sum(u.nbytes for u in units) == sum(j.length for j in jobs)
    assert {u.source for u in units} == {url}  # every unit from the seed, after a cut
    r = trace.analyse(units, cuts, peers, rate=1e6)
    assert r["seed_bytes"] == sum(j.length for j in jobs)
    assert r["seed_extra_bytes"] == {}  # one member: no second copies
    assert sum(r["cuts"].values()) == len(cuts) >= 1
    assert all("below" in why for why in r["cuts"])
    idle, queue = r["uploaders_idle_per_2s"], r["longest_peer_queue_per_2s"]
    assert len(idle) == len(queue) == len(r["units_per_2s"])
    assert set(idle) <= {0, 1} and queue == [0] * len(queue)  # one uploader, the seed: no peer
    going = [any(u.end - u.took <= 2 * i + 1 < u.end for u in units) for i in range(len(idle))]
    assert idle == [0 if g else 1 for g in going]
    assert trace.plot(r, 1e6, tmp_path / "trace.png")
    assert (tmp_path / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
