"""The coordinator's side of remote validators (trainer/validator_remote.py): tickets, their
expiry, answers that do not fit, and the port's token and bounds. The submission service is a
stand-in here (its batches are tested in test_validator_pool.py); the real thing, with a
remote validator process, is tests/integration/test_remote_validator.py."""

import time

import httpx
import msgspec
import pytest
import trio

from protocol.poolspec import CoordinatorSection, PoolSpec
from trainer.validator import Checked, Job, Verdict
from trainer.validator_remote import (
    MAX_ANSWER_BYTES,
    Answer,
    RemoteDesk,
    TicketError,
    Work,
    create_validator_app,
)

TOKEN = "t0ken"
SPEC = PoolSpec(name="test", coordinator=CoordinatorSection(public_key="ab" * 32))


class Submissions:
    """What the desk uses of `SubmissionService`: a queue of batches, and what it recorded."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.queue = [[{"id": i, "shared": False} for i in b] for b in batches]
        self.arrived = trio.Event()
        self.finished: list[tuple[list[int], str]] = []
        self.returned: list[list[int]] = []

    async def take_batch(self) -> list[dict]:
        while not self.queue:
            await self.arrived.wait()
        return self.queue.pop(0)

    def jobs(self, batch: list[dict]) -> list[Job]:
        return [Job(row["id"], b"raw", [{"prompt_index": 0}], b"lease") for row in batch]

    def current_version(self) -> int:
        return 7

    def finish_batch(self, batch: list[dict], checked: list[Checked], by: str = "") -> None:
        self.finished.append(([row["id"] for row in batch], by))

    def return_batch(self, batch: list[dict]) -> None:
        self.returned.append([row["id"] for row in batch])


def _checked(n: int) -> list[Checked]:
    return [Checked(Verdict("soft", "stale", "staleness"), 3, 0.1) for _ in range(n)]


def test_a_ticket_is_answered_once_and_recorded_as_the_remote_validators():
    async def main() -> None:
        subs = Submissions([[1, 2]])
        desk = RemoteDesk(subs, slots=2)
        work = await desk.pull("box", wait_s=1)
        assert (work.current_version, [j.submission_id for j in work.jobs]) == (7, [1, 2])
        with pytest.raises(TicketError, match="holds 2 submissions, not 1"):
            desk.answer(Answer(work.ticket, _checked(1)))
        desk.answer(Answer(work.ticket, _checked(2)))
        assert subs.finished == [([1, 2], "remote:box")] and not desk.tickets
        with pytest.raises(TicketError, match="no ticket"):
            desk.answer(Answer(work.ticket, _checked(2)))  # answered already
        assert await desk.pull("box", wait_s=0.05) is None  # nothing queued: None, no ticket
        assert not desk.tickets

    trio.run(main)


def test_an_error_or_a_late_answer_returns_the_batch_untouched():
    async def main() -> None:
        subs = Submissions([[1], [2, 3]])
        desk = RemoteDesk(subs, slots=2, job_timeout_s=10)
        first = await desk.pull("box", wait_s=1)
        desk.answer(Answer(first.ticket, error="versions not fetched"))
        second = await desk.pull("box", wait_s=1)
        assert desk.expire(time.monotonic()) == 0  # within its 10 s
        assert desk.expire(time.monotonic() + 11) == 1
        assert subs.returned == [[1], [2, 3]] and not subs.finished
        with pytest.raises(TicketError):
            desk.answer(Answer(second.ticket, _checked(2)))  # too late: the batch is back

    trio.run(main)


def test_an_answer_that_cannot_be_recorded_gives_its_batch_back():
    # The ticket went before the verdicts were recorded: one the algorithm refused (a group
    # of one reward) left the batch undecided, out of the queue, until a restart.
    class Refusing(Submissions):
        def finish_batch(self, batch: list[dict], checked: list[Checked], by: str = "") -> None:
            raise ValueError("a group needs at least two rewards")

    async def main() -> None:
        subs = Refusing([[1, 2]])
        desk = RemoteDesk(subs, slots=2)
        work = await desk.pull("box", wait_s=1)
        nan = [Checked(c.verdict, c.version, float("nan")) for c in _checked(2)]
        with pytest.raises(TicketError, match="finite"):
            desk.answer(Answer(work.ticket, nan))
        assert work.ticket in desk.tickets and not subs.returned  # refused before anything
        with pytest.raises(TicketError, match="back in the queue"):
            desk.answer(Answer(work.ticket, _checked(2)))
        assert subs.returned == [[1, 2]] and not desk.tickets

    trio.run(main)


def test_the_port_wants_the_token_and_bounds_tickets_and_bodies():
    async def main() -> None:
        subs = Submissions([[1]])
        desk = RemoteDesk(subs, slots=1)
        app = create_validator_app(desk, TOKEN, SPEC)
        transport = httpx.ASGITransport(app=app)
        auth = {"authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://v") as http:
            assert (await http.post("/validate/pull")).status_code == 401
            bad = {"authorization": "Bearer nope"}
            assert (await http.post("/validate/pull", headers=bad)).status_code == 403
            assert (await http.get("/validate/spec", headers=bad)).status_code == 403
            spec = await http.get("/validate/spec", headers=auth)
            assert msgspec.convert(msgspec.msgpack.decode(spec.content), PoolSpec) == SPEC
            r = await http.post("/validate/pull", headers=auth)
            work = msgspec.msgpack.decode(r.content, type=Work)
            # the one slot is held: another pull is refused at once
            assert (await http.post("/validate/pull", headers=auth)).status_code == 429
            junk = await http.post("/validate/answer", headers=auth, content=b"\xc1junk")
            assert junk.status_code == 400 and desk.tickets  # nothing changed
            huge = {**auth, "content-length": str(MAX_ANSWER_BYTES + 1)}
            assert (await http.post("/validate/answer", headers=huge)).status_code == 413
            body = msgspec.msgpack.encode(Answer(work.ticket, _checked(1)))
            ok = await http.post("/validate/answer", headers=auth, content=body)
            assert ok.status_code == 200 and subs.finished == [([1], "remote:validator")]

    trio.run(main)
