"""Validators on other machines the coordinator trusts: `coordinator run --validator-listen
HOST:PORT --validator-token-file F` serves them, `coordinator validator URL --token-file F`
runs one (trainer/validator_agent.py).

A remote validator reads the pool spec from the coordinator (`GET /validate/spec`), pulls a
batch (`POST /validate/pull`, a long poll), validates it exactly as a local worker does, and
posts the verdicts back (`POST /validate/answer`). The batch it holds is a *ticket*: the
submissions stay undecided in the ledger until the answer is recorded, and a ticket not
answered within `job_timeout_s`, or given back with an error (a version it could not fetch),
returns its submissions to the queue untouched. A remote validator that vanishes costs its
batch's delay, never a submission and never a strike against the nodes that sent them
(unlike a local worker that dies holding a batch).

Its verdicts are trusted as the coordinator's own: it decides accepts, rewards and bans.
Only a holder of the validator token may read the spec, pull or answer; the token is
compared in constant time before any body is read, and it is a separate secret from the
operator's. The port serves nothing else, every body is bounded, and at most `slots` tickets
are out at once.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import trio
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import Response

from protocol.poolspec import PoolSpec
from trainer.api import BodyLimit, bearer_token
from trainer.ledger import LedgerError
from trainer.submissions import SubmissionService
from trainer.validator import Checked, Job

log = logging.getLogger("swarmrl.validator_remote")

PULL_WAIT_S = 20.0
"""How long a pull waits for work before it answers 204 (the validator asks again)."""
MAX_ANSWER_BYTES = 512 << 20
"""The largest answer read: a batch's verdicts carry its groups' tokens and logprobs (a few
times the submissions, themselves at most `limits.max_submission_bytes` each)."""
MSGPACK = "application/msgpack"


class Work(msgspec.Struct, frozen=True):
    """A pulled batch: validate `jobs` as of trainer version `current_version`."""

    ticket: int
    current_version: int
    jobs: list[Job]


class Answer(msgspec.Struct, frozen=True):
    """The verdicts on a ticket's jobs, in order; or why there are none (`error`): the batch
    then goes back in the queue."""

    ticket: int
    checked: list[Checked] = []
    error: str = ""


@dataclass
class Ticket:
    batch: list[dict[str, Any]]
    deadline: float
    by: str


class TicketError(Exception):
    """An answer the desk cannot take: it does not fit a ticket held (unknown, expired, the
    wrong length), or a verdict in it cannot be recorded (its batch then goes back)."""


class RemoteDesk:
    """The coordinator's side: hands batches out as tickets and records their answers."""

    def __init__(
        self, submissions: SubmissionService, slots: int, job_timeout_s: float = 300.0
    ) -> None:
        self.submissions = submissions
        self.slots = slots
        self.job_timeout_s = job_timeout_s
        self.tickets: dict[int, Ticket] = {}
        self._pulling = 0
        self._numbers = itertools.count(1)
        self.answered = 0

    @property
    def full(self) -> bool:
        return len(self.tickets) + self._pulling >= self.slots

    async def pull(self, by: str, wait_s: float = PULL_WAIT_S) -> Work | None:
        """The next batch as a ticket for `by`, or None after `wait_s` without one."""
        self._pulling += 1  # a slot from now: concurrent pulls cannot overshoot `slots`
        try:
            batch: list[dict[str, Any]] = []
            with trio.move_on_after(wait_s):
                while not batch:
                    batch = await self.submissions.take_batch()  # cancel-safe until it returns
            if not batch:
                return None
            number = next(self._numbers)
            self.tickets[number] = Ticket(batch, time.monotonic() + self.job_timeout_s, by)
            version = self.submissions.current_version()
            return Work(number, version, self.submissions.jobs(batch))
        finally:
            self._pulling -= 1

    def answer(self, answer: Answer) -> None:
        ticket = self.tickets.get(answer.ticket)
        if ticket is None:
            raise TicketError(f"no ticket {answer.ticket} is held (expired, or never issued)")
        if answer.error:
            del self.tickets[answer.ticket]
            log.warning(
                "validator %s gave ticket %d back: %s", ticket.by, answer.ticket, answer.error[:200]
            )
            self.submissions.return_batch(ticket.batch)
            return
        if len(answer.checked) != len(ticket.batch):
            raise TicketError(
                f"ticket {answer.ticket} holds {len(ticket.batch)} submissions, "
                f"not {len(answer.checked)}"
            )
        if not all(math.isfinite(c.seconds) and c.seconds >= 0 for c in answer.checked):
            # what a verdict cost is charged to the newcomers' shared budget
            raise TicketError(f"ticket {answer.ticket}: seconds must be finite and >= 0")
        del self.tickets[answer.ticket]
        try:
            self.submissions.finish_batch(ticket.batch, answer.checked, by=f"remote:{ticket.by}")
        except (ValueError, TypeError, LedgerError) as e:
            # A verdict the algorithm or the ledger cannot take (a group of one reward, say):
            # the verdicts before it stand, and the batch goes back, where another validator
            # takes what is still undecided, instead of the whole batch waiting for a restart.
            self.submissions.return_batch(ticket.batch)
            raise TicketError(
                f"ticket {answer.ticket}: a verdict could not be recorded "
                f"({type(e).__name__}: {str(e)[:200]}); its batch is back in the queue"
            ) from None
        self.answered += len(answer.checked)

    def expire(self, now: float) -> int:
        """Tickets past their deadline: their batches back in the queue. Returns how many."""
        late = [n for n, t in self.tickets.items() if t.deadline <= now]
        for n in late:
            ticket = self.tickets.pop(n)
            log.warning("validator %s did not answer ticket %d in time", ticket.by, n)
            self.submissions.return_batch(ticket.batch)
        return len(late)

    async def expire_forever(self, every_s: float = 1.0) -> None:
        while True:
            self.expire(time.monotonic())
            await trio.sleep(every_s)


def create_validator_app(desk: RemoteDesk, token: str, spec: PoolSpec) -> FastAPI:
    """The validators' port: the pool spec, pull and answer, for holders of `token` only."""
    if not token:
        raise ValueError("remote validators need a token")
    secret = token.encode()
    app = FastAPI(title="swarmrl validators", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=MAX_ANSWER_BYTES)

    def check(request: Request) -> None:
        # before any body is read: a caller without the token costs one header compare
        given = bearer_token(request.headers.get("authorization", ""))
        if not hmac.compare_digest(given, secret):
            raise HTTPException(403, "wrong validator token")

    spec_bytes = msgspec.msgpack.encode(msgspec.to_builtins(spec))

    @app.get("/validate/spec")
    def pool_spec(request: Request) -> Response:
        """The spec the coordinator runs (with any `--set`): what a validator builds from."""
        check(request)
        return Response(spec_bytes, media_type=MSGPACK)

    @app.post("/validate/pull")
    async def pull(
        request: Request, name: str = Query("validator", min_length=1, max_length=64)
    ) -> Response:
        check(request)
        if desk.full:
            raise HTTPException(429, f"all {desk.slots} validator slots are busy")
        work = await desk.pull(name)
        if work is None:
            return Response(status_code=204)
        return Response(msgspec.msgpack.encode(work), media_type=MSGPACK)

    @app.post("/validate/answer")
    async def answer(request: Request) -> dict[str, Any]:
        check(request)
        try:
            got = msgspec.msgpack.decode(await request.body(), type=Answer)
            desk.answer(got)
        except (msgspec.DecodeError, msgspec.ValidationError, TicketError) as e:
            raise HTTPException(400, str(e)[:500]) from None
        return {"recorded": len(got.checked), "returned": bool(got.error)}

    return app
