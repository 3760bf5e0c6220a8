"""The worker's side of admission: typed join codes, the join proof of work, rediscovery after
failed joins (the retries' jitter is in test_retries.py). The coordinator here is a real libp2p
host on 127.0.0.1 that serves discovery and answers joins from a script, so each code reaches
the real worker over the real transport."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from node.behaviour import Behaviour, NodeContext
from node.engine import HFEngine
from node.worker import MAX_RESTARTS, NodeError, Worker, WorkerOptions, node_errors_unwrapped
from protocol import messages as msg
from protocol import poolspec
from protocol import pow as join_pow
from protocol.discovery import DISCOVERY_PROTOCOL, PoolInfo, PoolQuery, make_pool_record
from protocol.envelope import Verified
from protocol.errors import ProtocolError
from protocol.host import Host
from protocol.identity import Identity

LOCAL = ["/ip4/127.0.0.1/tcp/0"]
POW_BITS = 8

Script = Callable[[int, Verified[msg.JoinRequest]], msg.JoinReply]


def test_a_node_error_leaves_nurseries_as_itself():
    async def fail() -> None:
        raise NodeError("banned for cause")

    async def main() -> None:
        with node_errors_unwrapped():
            async with trio.open_nursery() as outer:
                async with trio.open_nursery() as inner:
                    inner.start_soon(fail)
                    await trio.sleep_forever()
                outer.cancel_scope.cancel()

    with pytest.raises(NodeError, match="banned for cause"):
        trio.run(main)


async def _run_against(
    tmp_path: Path,
    script: Script,
    behaviour: Behaviour | None = None,
    stops_with: type[BaseException] = NodeError,
) -> tuple[BaseException, list, int, str]:
    """Run a worker against a scripted coordinator until the worker stops with `stops_with`;
    return it, the join requests the coordinator saw, how many discovery queries, the pool."""
    coordinator = Identity.generate()
    spec = poolspec.from_dict(
        {
            "name": "scripted",
            "coordinator": {"public_key": coordinator.public_key.hex()},
            "admission": {"join_pow_bits": POW_BITS},
        }
    )
    pool = poolspec.pool_id(spec)
    joins: list[Verified[msg.JoinRequest]] = []
    queries = 0
    async with Host.open(coordinator, pool, LOCAL) as host:
        record = make_pool_record(coordinator, spec, host.addrs)

        async def discovery(query: Verified[PoolQuery]) -> PoolInfo:
            nonlocal queries
            queries += 1
            return PoolInfo(record=record)

        host.serve(DISCOVERY_PROTOCOL, discovery, PoolQuery, PoolInfo)

        async def join(request: Verified[msg.JoinRequest]) -> msg.JoinReply:
            joins.append(request)
            return script(len(joins), request)

        host.serve(msg.JOIN_PROTOCOL, join, msg.JoinRequest, msg.JoinReply)
        worker = Worker(
            Identity.generate(),
            pool,
            HFEngine("cpu"),
            WorkerOptions(
                bootstrap=[f"{host.addrs[0]}/p2p/{host.peer_id}"],
                data_dir=tmp_path,
                listen=LOCAL,
                backoff_max_s=0.2,
                reseed=False,
                restart_wait_s=0.01,
            ),
            behaviour,
        )
        with pytest.raises(stops_with) as stopped, trio.fail_after(60):
            await worker.run()
    return stopped.value, joins, queries, pool


class _BrokenComponent(Behaviour):
    """Fails in the background as soon as the node has joined: a bug one component meets."""

    def __init__(self) -> None:
        self.runs = 0

    async def alongside(self, ctx: NodeContext) -> None:
        self.runs += 1
        raise RuntimeError(f"a bug met in run {self.runs}")


@pytest.mark.trio
async def test_an_unexpected_error_after_joining_restarts_the_node_then_a_recurring_one_ends_it(
    tmp_path,
):
    def script(n: int, request: Verified[msg.JoinRequest]) -> msg.JoinReply:
        return msg.JoinReply(accepted=True, weights_urls=["http://127.0.0.1:9"])

    broken = _BrokenComponent()
    error, joins, *_ = await _run_against(tmp_path, script, broken, stops_with=Exception)
    # started again MAX_RESTARTS times, each a fresh process-like start that gives back what
    # the failed run held; the next failure within the hour ends the node with the bug itself
    assert broken.runs == len(joins) == MAX_RESTARTS + 1
    assert all(j.message.fresh_start for j in joins)
    assert isinstance(error, RuntimeError) and str(error) == f"a bug met in run {len(joins)}"


@pytest.mark.trio
async def test_an_error_before_the_join_is_not_restarted(tmp_path):
    worker = Worker(
        Identity.generate(),
        "pool",
        HFEngine("cpu"),
        WorkerOptions(bootstrap=[], data_dir=tmp_path, listen=["/ip4/127.0.0.1/tcp/notaport"]),
    )
    with pytest.raises(ProtocolError, match="not a valid multiaddr"), trio.fail_after(30):
        await worker.run()
    assert worker.stats.restarts == 0


def _refuse(code: str, reason: str) -> msg.JoinReply:
    return msg.JoinReply(accepted=False, code=code, reason=reason)


@pytest.mark.trio
async def test_busy_is_waited_out_and_every_join_pays_the_proof_of_work(tmp_path):
    def script(n: int, request: Verified[msg.JoinRequest]) -> msg.JoinReply:
        if n < 3:
            return msg.JoinReply(accepted=False, code="busy", reason="full", retry_after_s=0.05)
        return _refuse("banned", "cheated")

    error, joins, _, pool = await _run_against(tmp_path, script)
    assert "banned" in str(error) and "cheated" in str(error)
    assert len(joins) == 3
    for j in joins:
        assert join_pow.check(pool, j.signer, j.message.pow_nonce, POW_BITS)
        assert j.message.fresh_start  # a process's first join: it holds no lease yet


@pytest.mark.trio
async def test_a_rejected_proof_of_work_is_fatal_and_says_so(tmp_path):
    error, joins, *_ = await _run_against(tmp_path, lambda n, r: _refuse("bad_pow", "no proof"))
    assert len(joins) == 1
    assert "proof of work" in str(error) and f"{POW_BITS} bits" in str(error)


@pytest.mark.trio
async def test_repeated_failed_joins_run_discovery_again(tmp_path):
    def script(n: int, request: Verified[msg.JoinRequest]) -> msg.JoinReply:
        if n <= 3:
            raise RuntimeError("coordinator restarting")  # answered as `internal`: retried
        return _refuse("banned", "enough")

    error, joins, queries, _ = await _run_against(tmp_path, script)
    assert "enough" in str(error)
    assert len(joins) == 4
    assert queries == 2  # the first discovery, and once more after 3 failed joins


def test_only_a_reply_that_finds_the_relay_unreachable_moves_the_seeder(tmp_path: Path):
    from types import SimpleNamespace

    options = WorkerOptions(bootstrap=[], data_dir=tmp_path)
    engine = SimpleNamespace(version=0)
    worker = Worker(Identity.generate(), "pool", engine, options)  # type: ignore[arg-type]

    async def main() -> list[bool]:
        seen = []
        for check in ("none", "ok", "failed", "refused", "unreachable"):
            reply = msg.HeartbeatReply(current_version=0, relay_check=check)
            await worker._on_heartbeat_reply(reply)
            seen.append(worker._unreachable.is_set())
        return seen

    assert trio.run(main) == [False, False, False, True, True]


def test_each_seeder_trusts_the_newest_version_the_node_trusts(tmp_path: Path):
    # The client fetches through the node's seeder; a seeder that believed every listing
    # mirrored a liar's made-up versions, asking its honest sources for each.
    from types import SimpleNamespace

    from node.seeding import make_seeder

    identity = Identity.generate()
    worker = Worker(identity, "pool", SimpleNamespace(version=0), WorkerOptions([], tmp_path))  # type: ignore[arg-type]

    def seeder():
        return worker._seeder_made(
            make_seeder(
                ["http://127.0.0.1:9"],
                tmp_path / "relay",
                identity=identity,
                public_key=identity.public_key,
                pool_id="pool",
                keep=2,
                upload_cap_mb=None,
            )
        )

    first = seeder()
    assert first.trusted is None  # the node trusts nothing yet
    worker._trust_version(3)
    assert first.trusted == 3
    assert seeder().trusted == 3  # a restarted seeder starts from what the node trusts
