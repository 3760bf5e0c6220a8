"""Validator worker processes: `[trainer] validators = N` (N >= 2) validates in N processes.

Each worker is a fresh interpreter (multiprocessing's spawn context: nothing of the
coordinator's threads, sockets or trio state is inherited) that builds its own `Validator`
and loads the version a submission claims from the coordinator's policy store on this
machine, as the in-process validator does, keeping its own small cache of versions. The
coordinator keeps one lane per worker (trainer.submissions): a lane takes a batch from the
trust-ordered queue, sends it as plain `Job`s over a pipe, and records the verdicts that come
back through the same ledger path as in-process validation.

A worker that dies (killed, out of memory) or does not answer within `job_timeout_s` is
killed and started again; the lane puts the batch it held back in the queue, since nothing is
decided in the ledger until a verdict is recorded. Every wait is bounded: start-up by
`start_timeout_s`, a batch by `job_timeout_s`, reaping a killed one by `stop_timeout_s`. A
worker that cannot start (its model does not load) stops the coordinator with
`ValidatorPoolError`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch
import trio

from protocol.errors import SwarmError
from protocol.poolspec import PoolSpec
from toploc.sampling import SamplingParams
from trainer.policy import PolicyStore
from trainer.tasks import Task
from trainer.validator import Backend, Checked, Job, Validator

log = logging.getLogger("swarmrl.validator_pool")


CLOSE_GRACE_S = 5.0
"""How long a closing pool waits for an idle worker to exit on its own before killing it."""


class ValidatorPoolError(SwarmError):
    """A validator worker could not start, or failed on a batch (a bug, not bad input)."""


class WorkerLost(SwarmError):
    """The worker died or stopped answering while it held a batch; it was killed, and the next
    call starts a fresh one."""


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs to build the coordinator's `Validator` (all picklable)."""

    spec: PoolSpec
    task: Task
    tokenizer: Any
    vocab_size: int
    pad_token_id: int
    sampling: SamplingParams
    weights: Path
    """The coordinator's policy store: one HF folder per published version."""
    cache_models: int
    device: str
    """Where the worker places the versions it loads (the coordinator's validator device)."""
    threads: int
    """torch threads in the worker (the coordinator's cores shared among the workers)."""
    backend: Backend = "hf"
    """The coordinator's validator backend: each worker builds its own (a vLLM engine each)."""


def worker_setup(
    validator: Validator, policy: PolicyStore, sampling: SamplingParams, workers: int
) -> WorkerSetup:
    """The setup that rebuilds `validator` in a worker, reading versions from `policy`."""
    return WorkerSetup(
        spec=validator.spec,
        task=validator.task,
        tokenizer=validator.tokenizer,
        vocab_size=validator.vocab_size,
        pad_token_id=validator.pad_token_id,
        sampling=sampling,
        weights=policy.root,
        cache_models=policy.cache_models,
        device=str(policy.device),
        threads=max(1, torch.get_num_threads() // workers),
        backend=validator.backend,
    )


def validator_pool(
    workers: int, validator: Validator, policy: PolicyStore, sampling: SamplingParams
) -> ValidatorPool | None:
    """`[trainer] validators`: N >= 2 worker processes; None (0 or 1) validates in a thread of
    the coordinator, as before there were workers."""
    if workers < 2:
        return None
    return ValidatorPool(workers, worker_setup(validator, policy, sampling, workers))


def _serve(conn: Connection) -> None:
    """The worker's main loop: its setup, then (jobs, current version) in, ("ok", [Checked])
    out."""
    try:
        setup: WorkerSetup = conn.recv()
        torch.set_num_threads(setup.threads)
        store = PolicyStore(
            setup.weights, setup.spec.model.dtype, 0, setup.cache_models, device=setup.device
        )
        validator = Validator(
            setup.spec,
            setup.task,
            setup.tokenizer,
            store.model,
            setup.vocab_size,
            setup.pad_token_id,
            backend=setup.backend,
        )
        store.latest_model()  # load the newest version now: a bad folder fails at start
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return  # the coordinator is gone
        if request is None:
            return
        jobs, current = request
        try:
            with torch.no_grad():
                conn.send(("ok", validator.validate_jobs(jobs, setup.sampling, current)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class Worker:
    """One validator process, started on first use and again after it is lost."""

    def __init__(
        self,
        index: int,
        setup: WorkerSetup,
        start_timeout_s: float,
        job_timeout_s: float,
        stop_timeout_s: float,
    ) -> None:
        self.index = index
        self.setup = setup
        self.start_timeout_s = start_timeout_s
        self.job_timeout_s = job_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.starts = 0
        self.in_flight: list[int] = []
        """Submission ids of the batch the worker holds now."""
        self.pid: int | None = None
        """The process id once it is ready."""
        self.process: BaseProcess | None = None
        self._conn: Connection | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    async def start(self) -> None:
        """Start the process if it is not running, and wait (bounded) until it is ready."""
        if self.alive:
            return
        self.stop()
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(theirs,), name=f"validator-{self.index}")
        process.daemon = True  # never outlives the coordinator
        process.start()  # small arguments: the setup goes over the pipe, under the time bound
        theirs.close()  # the worker's death must read as EOF here
        self.process, self._conn = process, ours
        self.starts += 1
        try:
            with trio.move_on_after(self.start_timeout_s) as scope:
                await trio.to_thread.run_sync(ours.send, self.setup, abandon_on_cancel=True)
            if scope.cancelled_caught:
                self.stop()
                raise WorkerLost(f"it took no setup in {self.start_timeout_s} s")
            kind, detail = await self._receive(self.start_timeout_s, "start")
        except (WorkerLost, OSError) as e:
            self.stop()
            raise ValidatorPoolError(f"validator worker {self.index} did not start: {e}") from None
        if kind != "ready":
            self.stop()
            raise ValidatorPoolError(f"validator worker {self.index} did not start:\n{detail}")
        self.pid = detail
        log.info("validator worker %d ready (pid %d)", self.index, detail)

    async def validate(self, jobs: list[Job], current_version: int) -> list[Checked]:
        """The verdicts on `jobs`; `WorkerLost` if the worker dies or hangs meanwhile."""
        await self.start()
        conn = self._conn
        assert conn is not None  # start() set it or raised
        self.in_flight = [j.submission_id for j in jobs]
        try:
            with trio.move_on_after(self.job_timeout_s) as scope:
                await trio.to_thread.run_sync(
                    conn.send, (jobs, current_version), abandon_on_cancel=True
                )
            if scope.cancelled_caught:
                self.stop()
                raise WorkerLost(f"worker {self.index} took no batch in {self.job_timeout_s} s")
            kind, detail = await self._receive(self.job_timeout_s, "batch")
        except (OSError, EOFError) as e:
            self.stop()
            raise WorkerLost(f"worker {self.index}: {e}") from None
        finally:
            self.in_flight = []
        if kind != "ok":
            raise ValidatorPoolError(f"validator worker {self.index} failed:\n{detail}")
        return detail

    async def _receive(self, timeout_s: float, what: str) -> tuple[str, Any]:
        conn = self._conn
        assert conn is not None
        with trio.move_on_after(timeout_s):
            try:
                return await trio.to_thread.run_sync(conn.recv, abandon_on_cancel=True)
            except (EOFError, OSError):
                code = self._reap()
                self.stop()
                raise WorkerLost(
                    f"worker {self.index} exited (code {code}) during {what}"
                ) from None
        # Killing it also ends the abandoned thread's recv (EOF).
        self.stop()
        raise WorkerLost(f"worker {self.index} gave no answer in {timeout_s} s ({what})")

    def _reap(self) -> int | None:
        """The exit code of a worker whose pipe closed (it is exiting, or gone)."""
        if self.process is None:
            return None
        self.process.join(timeout=self.stop_timeout_s)
        return self.process.exitcode

    def stop(self, grace_s: float = 0.0) -> None:
        """End the worker, if any: closing its pipe asks it to exit, and it is killed if it
        has not within `grace_s`. What it held stays undecided in the ledger, so nothing is
        lost: the lane re-queues it, or a restart of the coordinator does."""
        process, conn = self.process, self._conn
        self.process, self._conn, self.pid = None, None, None
        if conn is not None:
            conn.close()  # EOF in the worker's recv: an idle worker returns
        if process is not None:
            # An exit of its own runs the worker's finalizers: a killed one leaves the
            # semaphores it registered (tqdm's lock, say) for the resource tracker to warn of.
            process.join(timeout=grace_s)
            if process.is_alive():
                process.kill()
            process.join(timeout=self.stop_timeout_s)


class ValidatorPool:
    """N validator workers; `trainer.submissions` runs one lane per worker."""

    def __init__(
        self,
        workers: int,
        setup: WorkerSetup,
        start_timeout_s: float = 600.0,
        job_timeout_s: float = 900.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        if workers < 2:
            raise ValueError("a pool has 2 or more workers (fewer validate in-process)")
        self.workers = [
            Worker(i, setup, start_timeout_s, job_timeout_s, stop_timeout_s) for i in range(workers)
        ]

    def close(self) -> None:
        """End every worker: each gets `CLOSE_GRACE_S` to exit on its own."""
        for w in self.workers:
            w.stop(grace_s=CLOSE_GRACE_S)
