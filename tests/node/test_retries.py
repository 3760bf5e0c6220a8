"""The worker's retries (tenacity underneath): jittered so that nodes which lost the same
coordinator do not come back in lockstep, capped, with the coordinator's `retry_after_s` as a
floor, and never for a refusal that a later try cannot change. Fake calls stand in for the
coordinator; trio's autojump clock makes the waits instant and measures them exactly."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from node.worker import (
    FIRST_RETRY_S,
    IDLE_JITTER_MAX_S,
    LEASE_WAIT_S,
    MAX_WAIT_S,
    MIN_HEARTBEAT_S,
    PACE_SHARE,
    NodeError,
    Worker,
    WorkerOptions,
    seconds_within,
)
from protocol import messages as msg
from protocol.errors import RemoteError, TransportError
from protocol.host import ErrorCode
from protocol.identity import Identity


def _worker(tmp_path: Path, cap_s: float = 30.0) -> Worker:
    options = WorkerOptions(bootstrap=[], data_dir=tmp_path, backoff_max_s=cap_s)
    engine = SimpleNamespace(version=0)  # asked only which version it holds
    return Worker(Identity.generate(), "pool", engine, options)  # type: ignore[arg-type]


def _failing(errors: list[Exception], then: Any = "done") -> tuple[Callable, list[float]]:
    """A call that raises each of `errors` in turn, then returns `then`; and the (virtual)
    times at which it was called."""
    calls: list[float] = []

    async def call(*args: Any) -> Any:
        calls.append(trio.current_time())
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return then

    return call, calls


async def _nothing() -> None:
    """Stands in for the node's check for newer weights: none."""


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


@pytest.mark.trio
async def test_nodes_failing_together_retry_apart(tmp_path, autojump_clock):
    """A restarted coordinator: every node's call fails at the same instant. The first
    retries are drawn below FIRST_RETRY_S, each node its own wait."""
    firsts: list[float] = []

    async def node() -> None:
        call, times = _failing([TransportError("connection refused")])
        assert await _worker(tmp_path)._retry("lease", call) == "done"
        firsts.extend(_gaps(times))

    async with trio.open_nursery() as nursery:
        for _ in range(40):
            nursery.start_soon(node)
    assert len(firsts) == 40
    assert all(0 <= w < FIRST_RETRY_S for w in firsts)
    # spread over the window, not one shared instant
    assert len({round(w, 6) for w in firsts}) > 30
    assert max(firsts) - min(firsts) > FIRST_RETRY_S / 2


@pytest.mark.trio
async def test_waits_double_up_to_the_cap_and_stay_jittered(tmp_path, autojump_clock):
    call, times = _failing([TransportError("down")] * 40)
    assert await _worker(tmp_path, cap_s=2.0)._retry("join", call) == "done"
    waits = _gaps(times)
    assert len(waits) == 40
    windows = [min(FIRST_RETRY_S * 2**i, 2.0) for i in range(40)]
    assert all(0 <= w <= cap for w, cap in zip(waits, windows, strict=True))
    capped = waits[3:]  # the window reached the cap: 0.5, 1, 2, 2, ...
    assert max(capped) - min(capped) > 1.0


@pytest.mark.trio
async def test_the_coordinators_retry_after_is_a_floor(tmp_path, autojump_clock, caplog):
    call, times = _failing([RemoteError("rate_limited", "slow down", retry_after_s=5.0)])
    worker = _worker(tmp_path)
    caplog.set_level("WARNING", logger="swarmrl.node")
    assert await worker._retry("submit", call) == "done"
    (wait,) = _gaps(times)
    assert 5.0 <= wait < 5.0 + FIRST_RETRY_S
    assert "submit failed (peer refused the request (rate_limited): slow down); retrying in" in (
        caplog.text
    )
    assert worker.stats.state == "waiting (submit)"


@pytest.mark.trio
@pytest.mark.parametrize(
    "said, low, high", [(math.inf, MAX_WAIT_S, MAX_WAIT_S + 1), (math.nan, 0, 1)]
)
async def test_a_wait_the_coordinator_names_is_kept_within_bounds(
    tmp_path, autojump_clock, said, low, high
):
    # inf (or NaN) from a buggy coordinator stopped the node's retries for good
    call, times = _failing([RemoteError("rate_limited", "later", retry_after_s=said)])
    assert await _worker(tmp_path)._retry("lease", call) == "done"
    (wait,) = _gaps(times)
    assert low <= wait < high
    assert seconds_within(0.2, MIN_HEARTBEAT_S, MAX_WAIT_S) == MIN_HEARTBEAT_S


@pytest.mark.trio
@pytest.mark.parametrize(
    "error",
    [RemoteError("refused", "not yours"), RemoteError("banned", "cheated"), ValueError("bug")],
)
async def test_a_final_error_is_raised_at_once(tmp_path, autojump_clock, error):
    call, times = _failing([error])
    with pytest.raises(type(error)) as raised:
        await _worker(tmp_path)._retry("lease", call)
    assert raised.value is error
    assert len(times) == 1


@pytest.mark.trio
@pytest.mark.parametrize("code", [ErrorCode.OVERLOADED, ErrorCode.PEER_BUSY, ErrorCode.STALE])
async def test_the_coordinators_load_and_a_stale_envelope_are_waited_out(
    tmp_path, autojump_clock, code
):
    # Taken as final, strangers that filled the coordinator's request buffers made every
    # honest node's lease request raise, and the node exit.
    worker = _worker(tmp_path)
    lease = msg.LeaseReply(code="finished")
    errors = [RemoteError(code, "later", retry_after_s=1.0)] * 3
    call, times = _failing(errors, then=lease)
    worker._call = call  # type: ignore[method-assign]
    worker._swap_if_newer = _nothing  # type: ignore[method-assign]
    assert await worker._request_lease() is lease
    assert len(times) == 4 and all(w >= 1.0 for w in _gaps(times))


@pytest.mark.trio
async def test_a_node_the_coordinator_does_not_know_joins_again_once(tmp_path, autojump_clock):
    # Refused as no member, the node exited: a coordinator restarted onto another ledger
    # lost every node. It joins again and asks once more; refused again, it stops.
    worker = _worker(tmp_path)
    lease = msg.LeaseReply(code="finished")
    forbidden = RemoteError(ErrorCode.FORBIDDEN, "not admitted here")
    joins: list[str] = []

    async def join(relay_url: str = "", fresh: bool = False) -> None:
        joins.append(relay_url)

    worker._join = join  # type: ignore[method-assign]
    worker._swap_if_newer = _nothing  # type: ignore[method-assign]
    worker._call, times = _failing([forbidden], then=lease)  # type: ignore[method-assign]
    assert await worker._request_lease() is lease
    assert len(times) == 2 and len(joins) == 1
    worker._call, times = _failing([forbidden, forbidden], then=lease)  # type: ignore[method-assign]
    with pytest.raises(NodeError, match="forbidden"):
        await worker._request_lease()
    assert len(times) == 2 and len(joins) == 2


def _coordinator(worker: Worker, replies: list[Any]) -> list[float]:
    """Answer the worker's calls with `replies` in turn; return the times of the calls."""
    times: list[float] = []

    async def call(protocol_id: str, message: Any, reply_type: type, *args: Any) -> Any:
        times.append(trio.current_time())
        return replies[len(times) - 1]

    worker._call = call  # type: ignore[method-assign]
    worker._swap_if_newer = _nothing  # type: ignore[method-assign]
    return times


@pytest.mark.trio
async def test_idle_replies_are_waited_out_above_retry_after(tmp_path, autojump_clock):
    worker = _worker(tmp_path)
    busy = msg.LeaseReply(code="busy", retry_after_s=3.0, reason="full")
    times = _coordinator(worker, [busy, busy, busy, msg.LeaseReply(code="finished")])
    assert await worker._next_lease() is None
    waits = _gaps(times)
    assert len(waits) == 3
    assert all(3.0 <= w < 3.0 + IDLE_JITTER_MAX_S for w in waits)
    assert worker.stats.state == "pool finished"
    assert dict(worker.stats.replies) == {"lease:busy": 3, "lease:finished": 1}


@pytest.mark.trio
async def test_a_busy_validation_queue_is_waited_out_until_the_deadline(tmp_path, autojump_clock):
    worker = _worker(tmp_path)
    busy = msg.Receipt(lease_id=1, queued=False, code="busy")
    queued = msg.Receipt(lease_id=1, queued=True)
    lease = SimpleNamespace(lease_id=1, deadline_ms=int(time.time() * 1000) + 3_600_000)
    times = _coordinator(worker, [busy, busy, queued])
    await worker._submit(None, lease)  # type: ignore[arg-type]
    assert len(times) == 3 and worker.stats.replies["receipt:queued"] == 1

    # past the deadline an answer would be late anyway: no retry
    worker = _worker(tmp_path)
    late = SimpleNamespace(lease_id=2, deadline_ms=int(time.time() * 1000) - 1)
    times = _coordinator(worker, [busy, queued])
    await worker._submit(None, late)  # type: ignore[arg-type]
    assert len(times) == 1 and worker.stats.replies["receipt:busy"] == 1


@pytest.mark.trio
async def test_a_held_lease_request_is_asked_again_at_once_a_quick_busy_is_waited_out(
    tmp_path, autojump_clock
):
    """A `busy` with `retry_after_s` 0 after the coordinator held the request about as long
    as offered: ask again at once. The same answer given at once is waited out, jittered: a
    coordinator cannot make its nodes spin."""
    worker = _worker(tmp_path)
    held = msg.LeaseReply(code="busy", retry_after_s=0.0, reason="enough work in flight")
    replies = [(LEASE_WAIT_S, held), (0.0, held), (0.0, msg.LeaseReply(code="finished"))]
    times: list[float] = []

    async def call(protocol_id: str, message: Any, reply_type: type, *args: Any) -> Any:
        assert message.wait_s == LEASE_WAIT_S
        times.append(trio.current_time())
        took, reply = replies[len(times) - 1]
        await trio.sleep(took)
        return reply

    worker._call = call  # type: ignore[method-assign]
    worker._swap_if_newer = _nothing  # type: ignore[method-assign]
    assert await worker._next_lease() is None
    held_gap, quick_gap = _gaps(times)
    assert held_gap == LEASE_WAIT_S  # the hold itself, then straight back
    assert 0 < quick_gap <= FIRST_RETRY_S
    assert worker.idle.is_set()  # no lease came: a stop need not wait


@pytest.mark.trio
async def test_requests_to_the_coordinator_keep_under_the_pools_rate(tmp_path, autojump_clock):
    worker = _worker(tmp_path)
    limits = SimpleNamespace(requests_per_s=20.0)
    worker.location = SimpleNamespace(spec=SimpleNamespace(limits=limits))  # type: ignore[assignment]
    start = trio.current_time()
    for _ in range(100):
        await worker._pace()
    # 15 a second (PACE_SHARE of 20), the first 15 at once: 85 more take 85 / 15 s
    assert PACE_SHARE == 0.75
    assert trio.current_time() - start == pytest.approx(85 / 15)
