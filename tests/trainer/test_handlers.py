"""The coordinator's lease and submission handlers, called in-process: leasing stops where more
work would go stale; a retried submission (its receipt was lost) is taken once and never
punished; a second, different answer to the same lease is a hard reject."""

import time

import msgspec
import pytest
import trio
import trio.testing

from node.hardware import probe
from protocol import messages as msg
from protocol import poolspec
from protocol.envelope import EnvelopeVerifier, seal
from protocol.errors import SwarmError
from protocol.identity import Identity
from tests.trainer.pools import tiny_coordinator
from trainer.config import AlgorithmSection, TrainerConfig
from trainer.coordinator import Coordinator, RunOptions
from trainer.leasing import LEASE_HOLD_S
from trainer.ledger import Decision, NewGroup


def _coordinator(tmp_path, admission=None, batch_prompts=2, **limits) -> Coordinator:
    config = TrainerConfig(algorithm=AlgorithmSection(batch_prompts=batch_prompts))
    return tiny_coordinator(
        tmp_path, config, limits={"lease_prompts": 1, **limits}, admission=admission or {}
    )


class Member:
    """A node identity talking to the coordinator's handlers directly."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.identity = Identity.generate()
        self.verifier = EnvelopeVerifier(coord.pool_id)

    @property
    def key(self) -> bytes:
        return self.identity.public_key

    def signed(self, message):
        raw = seal(self.identity, self.coord.pool_id, message)
        return self.verifier.open(raw, type(message))

    async def join(self, trusted: bool = False, fresh_start: bool = False) -> msg.JoinReply:
        hardware = probe("cpu", self_test_s=0.0)
        request = msg.JoinRequest(hardware, "hf", "test", fresh_start=fresh_start)
        joined = await self.coord.on_join(self.signed(request))
        if trusted and joined.accepted:
            self.coord.ledger.set_probation(self.key, False)
        return joined

    async def lease(self, wait_s: float = 0.0) -> msg.LeaseReply:
        request = msg.LeaseRequest(weight_version=0, wait_s=wait_s)
        return await self.coord.leases.on_lease(self.signed(request))

    async def release(self, lease: msg.Lease) -> msg.Receipt:
        return await self.coord.leases.on_release(
            self.signed(msg.ReleaseLease(lease_id=lease.lease_id))
        )

    async def submit(self, lease: msg.Lease, token: int = 5) -> msg.Receipt:
        done = msg.Completion(
            tokens=[token, 6], logprobs=[-1.0, -1.0], finish_reason="length", proofs=[]
        )
        answer = msg.Submission(
            lease_id=lease.lease_id,
            weight_version=0,
            results=[
                msg.TaskResult(task_index=i, completions=[done, done])
                for i in range(len(lease.tasks))
            ],
        )
        return await self.coord.submissions.on_submit(self.signed(answer))


def _play(coord: Coordinator, scenario, clock=None) -> None:
    """Run one handler scenario against `coord`, then close its ledger whatever happened."""
    try:
        trio.run(scenario, clock=clock)
    finally:
        coord.close()


def test_leasing_stops_at_a_batch_of_done_work_and_at_the_staleness_window(tmp_path):
    # batch 2, one prompt per lease, max_staleness 3: at most 3 x 2 = 6 groups done + leased,
    # and no new lease while a batch (2) of done work waits for the trainer. Each trusted
    # node starts with a quota of one lease, so seven nodes ask.
    coord = _coordinator(tmp_path, max_staleness=3)
    nodes = [Member(coord) for _ in range(7)]

    async def scenario():
        for n in nodes:
            assert (await n.join(trusted=True)).accepted
        leases = [(await n.lease()).lease for n in nodes[:6]]
        assert all(lease is not None for lease in leases)
        full = await nodes[6].lease()
        assert full.lease is None and full.code == "busy"
        assert (await nodes[0].release(leases[0])).code == "released"
        assert (await nodes[1].release(leases[1])).code == "released"
        assert (await nodes[6].lease()).lease is not None  # 5 leased: room again
        assert (await nodes[2].submit(leases[2])).queued  # 1 done + 4 leased
        assert (await nodes[0].lease()).lease is not None  # 1 done + 5 leased
        assert (await nodes[3].submit(leases[3])).queued  # 2 done: a batch waits
        waiting = await nodes[1].lease()
        assert waiting.lease is None and waiting.code == "busy"

    _play(coord, scenario)


async def _full_pool(nodes: list[Member]) -> list[msg.Lease]:
    """Every node joined and trusted; the first six hold a lease each, which fills a pool of
    batch 2 and staleness 3 (6 groups)."""
    for n in nodes:
        assert (await n.join(trusted=True)).accepted
    return [(await n.lease()).lease for n in nodes[:6]]


def test_a_held_lease_request_is_leased_the_moment_a_lease_closes(tmp_path):
    coord = _coordinator(tmp_path, max_staleness=3)
    nodes = [Member(coord) for _ in range(7)]
    replies: list[tuple[float, msg.LeaseReply]] = []

    async def ask(node: Member, wait_s: float) -> None:
        t0 = trio.current_time()
        reply = await node.lease(wait_s=wait_s)
        replies.append((trio.current_time() - t0, reply))

    async def scenario():
        leases = await _full_pool(nodes)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, nodes[6], 5.0)
            await trio.sleep(1.0)
            assert replies == []  # held: nothing to lease yet
            assert (await nodes[0].release(leases[0])).code == "released"
        ((took, reply),) = replies
        assert reply.lease is not None and 1.0 <= took < 1.1  # at the release, not after 5 s

    _play(coord, scenario, trio.testing.MockClock(autojump_threshold=0))


def test_a_held_request_that_finds_no_work_comes_back_busy_to_be_asked_again(tmp_path):
    coord = _coordinator(tmp_path, max_staleness=3)
    nodes = [Member(coord) for _ in range(7)]

    async def scenario():
        await _full_pool(nodes)
        t0 = trio.current_time()
        reply = await nodes[6].lease(wait_s=60.0)  # the coordinator's cap wins
        assert reply.lease is None and reply.code == "busy" and reply.retry_after_s == 0
        assert trio.current_time() - t0 == pytest.approx(LEASE_HOLD_S)
        # Not held: a node that did not offer to wait, and a second request of a node whose
        # first is held (one held request per node).
        assert (await nodes[6].lease()).retry_after_s > 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(nodes[6].lease, 5.0)
            await trio.sleep(0.5)
            t1 = trio.current_time()
            second = await nodes[6].lease(wait_s=5.0)
            assert second.code == "busy" and second.retry_after_s > 0
            assert trio.current_time() == t1

    _play(coord, scenario, trio.testing.MockClock(autojump_threshold=0))


def test_a_node_on_probation_is_not_held_and_a_wait_past_the_bound_is_refused(tmp_path):
    # Newcomers (free keys, a fresh one after a ban among them) get their probation terms at
    # once, whatever they offer to wait; no message may ask for more than 60 s.
    coord = _coordinator(tmp_path, max_staleness=3)
    nodes = [Member(coord) for _ in range(7)]
    newcomer = Member(coord)

    async def scenario():
        await _full_pool(nodes)
        assert (await newcomer.join()).accepted
        t0 = trio.current_time()
        first = await newcomer.lease(wait_s=5.0)
        assert first.lease is not None  # its own probation slot, trusted work aside
        second = await newcomer.lease(wait_s=5.0)
        assert second.lease is None and second.code == "quota"  # one lease at a time
        assert trio.current_time() == t0  # answered at once both times
        fields = msgspec.to_builtins(msg.LeaseRequest(weight_version=0, wait_s=60.0))
        ok = msgspec.msgpack.decode(msgspec.msgpack.encode(fields), type=msg.LeaseRequest)
        assert ok.wait_s == 60.0
        with pytest.raises(msgspec.ValidationError, match="wait_s"):
            fields["wait_s"] = 61.0
            msgspec.msgpack.decode(msgspec.msgpack.encode(fields), type=msg.LeaseRequest)

    _play(coord, scenario, trio.testing.MockClock(autojump_threshold=0))


def test_groups_a_step_took_count_as_trained_before_their_checkpoint(tmp_path):
    # A batch (2 groups) accepted stops leasing. Once a step takes it, the ledger still says
    # "untrained" until a checkpoint commits the step, but leasing must start again at once.
    coord = _coordinator(tmp_path, max_staleness=3)
    nodes = [Member(coord) for _ in range(3)]
    got: list[msg.LeaseReply] = []

    async def ask() -> None:
        got.append(await nodes[2].lease(wait_s=5.0))

    async def scenario():
        for n in nodes:
            assert (await n.join(trusted=True)).accepted
        for n in nodes[:2]:
            receipt = await n.submit((await n.lease()).lease)
            group = NewGroup(0, 0, 0, [1.0, 0.0], [0.5, -0.5], b"x", 2)
            accept = Decision("accept", "ok", groups=[group])
            coord.ledger.decide(receipt.submission_id, accept, coord.admission, time.time())
        assert coord.ledger.count_trainable(0) == 2
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await trio.sleep(1.0)
            assert got == []  # a batch waits for the trainer
            held = {g.id: g.weight_version for g in coord.ledger.trainable_groups(0, 2)}
            coord.training._held.update(held)  # what a step does as it takes its batch
            coord.leases.demand.fire()
        assert got[0].lease is not None
        assert coord.ledger.count_trainable(0) == 2  # still untrained in the ledger

    _play(coord, scenario, trio.testing.MockClock(autojump_threshold=0))


def test_resubmission_is_idempotent_and_a_different_answer_is_refused(tmp_path):
    coord = _coordinator(tmp_path)
    member = Member(coord)

    async def scenario():
        await member.join(trusted=True)
        reply = await member.lease()
        lease = reply.lease
        assert lease is not None, reply.reason
        first = await member.submit(lease)
        assert first.code == "queued" and first.submission_id > 0, first.reason
        # the same content signed again (a new envelope, as a node's retry makes)
        again = await member.submit(lease)
        assert again.code == "repeat" and again.submission_id == first.submission_id
        assert coord.ledger.node(member.key)["hard_rejected"] == 0
        # other content for the answered lease
        refused = await member.submit(lease, token=7)
        assert not refused.queued and refused.code == "refused"
        assert coord.ledger.node(member.key)["hard_rejected"] == 1

    _play(coord, scenario)


def test_a_heartbeat_from_a_key_the_ledger_does_not_know_says_join_again(tmp_path):
    coord = _coordinator(tmp_path)
    stranger = Member(coord)

    async def scenario():
        reply = await coord.on_heartbeat(stranger.signed(msg.Heartbeat(weight_version=0)))
        assert reply.code == "not_joined" and not reply.banned

    _play(coord, scenario)


def test_late_answer_is_a_soft_reject(tmp_path):
    coord = _coordinator(tmp_path)
    member = Member(coord)

    async def scenario():
        await member.join(trusted=True)
        lease = (await member.lease()).lease
        coord.ledger.expire_leases(time.time() + 3600)
        late = await member.submit(lease)
        assert not late.queued and late.code == "late"
        node = coord.ledger.node(member.key)
        assert (node["soft_rejected"], node["hard_rejected"]) == (1, 0)

    _play(coord, scenario)


def test_late_answers_are_recorded_once_and_leave_the_ban_window_alone(tmp_path):
    # Recorded each time, copies of one late answer grew the ledger by their bytes (8 MiB
    # each) and, as verdicts without strikes, pushed a cheat's strike out of the ban window.
    coord = _coordinator(tmp_path)
    member = Member(coord)

    async def scenario():
        await member.join(trusted=True)
        answered = (await member.lease()).lease
        assert (await member.submit(answered)).code == "queued"
        late = (await member.lease()).lease
        coord.ledger.expire_leases(time.time() + 3600)
        assert (await member.submit(answered, token=7)).code == "refused"  # a proven lie
        before = coord.ledger.node(member.key)["reputation"]
        assert before < 0
        for _ in range(25):
            assert (await member.submit(late)).code == "late"
        node = coord.ledger.node(member.key)
        assert (node["soft_rejected"], node["reputation"]) == (1, before)
        rows = coord.ledger._db.execute(
            "SELECT raw FROM submissions WHERE node = ? AND lease_id IS NULL", (member.key,)
        ).fetchall()
        # two rows outside leases: the lie, kept whole as evidence, and one late answer, bare
        assert sorted(bool(r[0]) for r in rows) == [False, True]

    _play(coord, scenario)


def test_a_new_learning_rate_resumes_the_same_pool(tmp_path):
    key = Identity.generate()
    spec = poolspec.from_dict(
        {
            "name": "t",
            "coordinator": {"public_key": key.public_key.hex()},
            "model": {"name": "tiny"},
            "task": {"name": "copy", "options": {"digits": 1}},
        }
    )
    first = Coordinator(spec, key, RunOptions(data_dir=tmp_path), TrainerConfig())
    first.training.learner.start_checkpoint(1, 1)
    first.training.learner.finish_checkpoint()
    first.ledger.commit_step(1, 1, [], {}, time.time())
    first.close()
    faster = TrainerConfig(algorithm=AlgorithmSection(lr=3e-3, warmup_steps=0))
    again = Coordinator(spec, key, RunOptions(data_dir=tmp_path), faster)
    try:
        again.training.restore()  # the checkpoint was saved with the default lr, 1e-5
        assert again.training.step == 1 and again.pool_id == first.pool_id
        assert [g["lr"] for g in again.training.learner.trainer.optimizer.param_groups] == [3e-3]
    finally:
        again.close()


def test_a_failed_start_leaves_nothing_that_blocks_the_next(tmp_path):
    key = Identity.generate()

    def spec(model: str):
        return poolspec.from_dict(
            {
                "name": "t",
                "coordinator": {"public_key": key.public_key.hex()},
                "model": {"name": model},
                "task": {"name": "copy", "options": {"digits": 1}},
            }
        )

    data = tmp_path / "pool"
    with pytest.raises(SwarmError):
        Coordinator(spec(str(tmp_path / "no-such-model")), key, RunOptions(data_dir=data))
    assert not (data / "ledger.sqlite").exists()
    fixed = Coordinator(spec("tiny"), key, RunOptions(data_dir=data))  # the same data dir
    fixed.close()


def test_token_ids_are_bounded_by_the_embeddings_not_the_tokenizer():
    from toploc.models import load_model
    from trainer.coordinator import vocab_rows

    model, tokenizer = load_model("tiny")
    assert vocab_rows(model) == len(tokenizer)
    # padded rows (Qwen2.5 has 271 of them) can be sampled by an honest node
    model.resize_token_embeddings(len(tokenizer) + 7, mean_resizing=False)
    assert vocab_rows(model) == len(tokenizer) + 7
    # a token added to the tokenizer alone has no row: an id for it cannot be prefilled
    tokenizer.add_tokens([f"<added{i}>" for i in range(9)])
    assert len(tokenizer) > vocab_rows(model) == model.get_input_embeddings().weight.shape[0]


def test_a_heartbeat_reply_says_what_the_checks_found_at_the_nodes_relay(tmp_path, monkeypatch):
    import httpx

    import trainer.relays
    from tests.integration.pool import free_port

    monkeypatch.setattr(trainer.relays, "UNREACHABLE_FOR_S", 0.0)  # two checks will do
    coord = _coordinator(tmp_path)

    async def scenario():
        node = Member(coord)
        hardware = probe("cpu", self_test_s=0.0)
        nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there: as behind NAT
        join = msg.JoinRequest(hardware, "hf", "test", relay_url=nobody)
        assert (await coord.on_join(node.signed(join))).accepted
        beat = node.signed(msg.Heartbeat(weight_version=0))
        assert (await coord.on_heartbeat(beat)).relay_check == "none"  # not checked yet
        async with httpx.AsyncClient() as coord._probe_http:
            await coord.relays.check_all(0)
            assert (await coord.on_heartbeat(beat)).relay_check == "failed"  # once is not enough
            await coord.relays.check_all(0)
        assert (await coord.on_heartbeat(beat)).relay_check == "unreachable"

    _play(coord, scenario)
