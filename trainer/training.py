"""Training: take batches of validated groups, step, publish, checkpoint.

The ledger is the source of truth: a step's groups become trained in the same transaction
that records the step, and that happens only once a checkpoint covering the step is on disk.
Checkpoints are written every `checkpoint_every` steps (or as often as keeps their cost within
10% of the steps' time: trainer/checkpoint_pace.py) in the background while training goes
on; the steps trained since the last one are held in memory, their groups kept out of later
batches. A crash at any moment loses no accepted group and trains none twice: the groups of
uncommitted steps are still untrained in the ledger, so they go back to the queue, and the
trainer resumes from the checkpoint of the last committed step.

Versions are numbered apart from steps: each step makes the version after the newest one ever
published, so weights that went out before a crash are never contradicted by a retrained step
of the same number. Versions are published through the SHARDCAST origin and announced, signed,
on gossip.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgspec
import trio

from protocol.poolspec import PoolSpec
from shardcast.origin import Origin
from trainer.algorithm import FLAT, GroupAlgorithm
from trainer.checkpoint import CheckpointInfo, latest_committed
from trainer.checkpoint_pace import CheckpointPace
from trainer.config import AlgorithmSection
from trainer.environments.turns import transcript_sample
from trainer.evaluating import EvalService
from trainer.grpo import StepResult, TrainGroup
from trainer.ledger import GroupRecord, Ledger, StepCommit
from trainer.metrics import RunLog
from trainer.policy import PolicyStore
from trainer.validator import GroupPayload
from trainer.view import Progress

log = logging.getLogger("swarmrl.training")


class Trainer(Protocol):
    """What training needs of the learner: `trainer.learner.Learner` in one process,
    `trainer.distributed.RankGroup` across ranks. Calls come one at a time, from worker threads."""

    trainer: Any
    """The GRPOTrainer (its model's config names the EOS tokens)."""
    tokenizer: Any

    def step(self, groups: list[TrainGroup], version: int) -> StepResult: ...
    def set_lr(self, lr: float) -> None: ...
    def start_checkpoint(self, step: int, version: int) -> None: ...
    def finish_checkpoint(self) -> int | None: ...
    def restore(self, ckpt: CheckpointInfo) -> None: ...
    def publishable(self) -> Any: ...


@dataclass
class _Trained:
    """A step trained but not yet covered by a checkpoint on disk."""

    commit: StepCommit
    versions: dict[int, int]
    """Its groups' ids and the versions they were generated with."""


class TrainingService:
    def __init__(
        self,
        spec: PoolSpec,
        settings: AlgorithmSection,
        ledger: Ledger,
        learner: Trainer,
        algorithm: GroupAlgorithm,
        policy: PolicyStore,
        tokenizer: Any,
        origin: Origin,
        run_log: RunLog,
        checkpoints: Path,
        announce: Callable[[int, int | None], Awaitable[None]],
        max_steps: int | None = None,
        checkpoint_every: int = 1,
        evaluator: EvalService | None = None,
        on_progress: Callable[[], None] = lambda: None,
    ) -> None:
        """`on_progress` is called once a step has taken its groups (work leased from then
        on counts towards the next batch) and once its version is published."""
        self.spec = spec
        self.settings = settings
        self.ledger = ledger
        self.learner = learner
        self.algorithm = algorithm
        self.policy = policy
        self.tokenizer = tokenizer
        self.origin = origin
        self.run_log = run_log
        self.checkpoints = checkpoints
        self._announce = announce
        self.max_steps = max_steps
        self.pace = CheckpointPace(checkpoint_every)
        self.evaluator = evaluator
        self._on_progress = on_progress
        self.step, committed = ledger.last_step()
        self.committed_step = self.step
        published = max((v["version"] for v in ledger.versions()), default=0)
        self.version = max(committed, published)
        """The newest version published (what leases hand out)."""
        self._made = self.version
        """The newest version a step made (published or not)."""
        self._making = self._made
        """The version the step in progress makes (`_made` between steps)."""
        self._trained: list[_Trained] = []
        self._held: dict[int, int] = {}
        """Group id -> weight version, for every group in `_trained`."""
        self._written: trio.Event | None = None
        """Set once the checkpoint in flight is on disk and its steps committed."""
        self.checkpoint_blocking_s = 0.0
        # Where this process picked up from the ledger: the API reports it so that anyone can
        # check a restart resumed at the committed step, even after training moved on.
        self.resumed_from = {"step": self.step, "version": self.version}
        self._flat_seen = ledger.dropped_since(FLAT, -1)[1]
        self._work = trio.Event()
        self.done = trio.Event()

    def progress(self) -> Progress:
        return Progress(
            self.step,
            self.version,
            dict(self.resumed_from),
            tuple(self._held.values()),
            self._making,
        )

    def restore(self) -> None:
        """Resume the model and optimizer from the checkpoint the ledger committed last."""
        ckpt = latest_committed(self.checkpoints, self.step)
        if ckpt is not None:
            self.learner.restore(ckpt)
            # The checkpoint holds the learning rate it was saved with; the config may have
            # changed it since (it is not part of the pool id), and the config wins.
            self.learner.set_lr(self.settings.lr)
            log.info("resumed at step %d (version %d) from %s", self.step, self.version, ckpt.path)

    def wake(self) -> None:
        """New validated work arrived."""
        self._work.set()

    async def train_forever(self) -> None:
        b = self.settings.batch_prompts
        async with trio.open_nursery() as nursery:
            self._evaluate_if_due(self.version, nursery)  # the starting point of the curve
            while self.max_steps is None or self.step < self.max_steps:
                version = self._made + 1
                min_version = self.spec.limits.oldest_trainable(self._made)
                # Groups held by uncommitted steps are trained already: never drop them.
                stale = self.ledger.drop_stale(min([min_version, *self._held.values()]))
                if stale:
                    log.info("dropped %d stale groups (older than v%d)", stale, min_version)
                chosen = [
                    g
                    for g in self.ledger.trainable_groups(min_version, b + len(self._held))
                    if g.id not in self._held
                ][:b]
                if len(chosen) < b:
                    self._work = trio.Event()
                    with trio.move_on_after(1.0):
                        await self._work.wait()
                    continue
                await self._step(self.step + 1, version, chosen, stale, nursery)
            if self._trained:
                await self._checkpoint(self.step, self._made, nursery)
            if self._written is not None:
                await self._written.wait()
        self.done.set()

    async def _step(
        self,
        n: int,
        version: int,
        chosen: list[GroupRecord],
        stale: int,
        nursery: trio.Nursery,
    ) -> None:
        batch = self.algorithm.batch([self._train_group(g) for g in chosen])
        self._held.update({g.id: g.weight_version for g in chosen})
        self._making = version
        self._on_progress()
        result = await trio.to_thread.run_sync(self.learner.step, batch, version)
        flat, self._flat_seen = self.ledger.dropped_since(FLAT, self._flat_seen)
        metrics = {
            **result.metrics,
            "frac_reward_zero_std": flat / (flat + len(chosen)),
            "dropped_stale": float(stale),
        }
        changed = {
            g.group_id: g.advantages
            for g, stored in zip(batch, chosen, strict=True)
            if g.advantages != stored.advantages
        }
        commit = StepCommit(n, version, result.trained, metrics, changed)
        self._trained.append(_Trained(commit, {g.id: g.weight_version for g in chosen}))
        self.step, self._made = n, version
        if n % self.settings.publish_every == 0:
            await self.ensure_published(version)
            self._evaluate_if_due(version, nursery)
        self.pace.stepped(result.metrics["step_time_s"])
        writing = self._written is not None and not self._written.is_set()
        if self.pace.due(n, writing):
            await self._checkpoint(n, version, nursery)
            metrics["checkpoint_blocking_s"] = self.checkpoint_blocking_s
        self.run_log.step_done(n, version, metrics)
        log.info(
            "step %d: reward %.3f, %d groups, %.1fs",
            n,
            metrics["reward_mean"],
            len(chosen),
            metrics["step_time_s"],
        )

    def _evaluate_if_due(self, version: int, nursery: trio.Nursery) -> None:
        """Start an evaluation of published `version` beside training (trainer/evaluating.py):
        it loads the published weights itself, so it shares nothing with the steps."""
        if self.evaluator is not None:
            self.evaluator.start_if_due(version, nursery)

    async def _checkpoint(self, n: int, version: int, nursery: trio.Nursery) -> None:
        """Stage a checkpoint of step `n` and let it be written while training goes on; the
        steps it covers are committed once it is on disk. Blocks only to stage it (and for the
        previous write, if that is still going)."""
        t0 = time.perf_counter()
        if self._written is not None:
            await self._written.wait()
        await trio.to_thread.run_sync(self.learner.start_checkpoint, n, version)
        covered, self._trained = self._trained, []
        self._written = trio.Event()
        nursery.start_soon(self._commit_when_written, covered, self._written)
        self.checkpoint_blocking_s = time.perf_counter() - t0
        self.pace.checkpointed(self.checkpoint_blocking_s)

    async def _commit_when_written(self, covered: list[_Trained], written: trio.Event) -> None:
        try:
            await trio.to_thread.run_sync(self.learner.finish_checkpoint)
            self.ledger.commit_steps([t.commit for t in covered], time.time())
            for t in covered:
                for g in t.versions:
                    self._held.pop(g, None)
            self.committed_step = covered[-1].commit.step
        finally:
            written.set()

    def _train_group(self, g: GroupRecord) -> TrainGroup:
        p = msgspec.msgpack.decode(g.payload, type=GroupPayload)
        segments = p.segments or [[]] * len(p.tokens)
        samples = [
            transcript_sample(p.prompt_ids, t, lp, seg, tr)
            for t, lp, tr, seg in zip(p.tokens, p.logprobs, p.truncated, segments, strict=True)
        ]
        # Groups accepted before the ledger stored advantages are scored now, once.
        advantages = g.advantages or self.algorithm.score(g.rewards).advantages
        return TrainGroup(samples, g.rewards, advantages, g.weight_version, g.id)

    async def ensure_published(self, version: int) -> None:
        """Export `version` (the trainer's current weights) and publish it, if not done yet."""
        if version in self.origin.store.versions:
            self.version = max(self.version, version)
            return
        model = await trio.to_thread.run_sync(self.learner.publishable)
        folder = await trio.to_thread.run_sync(self.policy.export, model, self.tokenizer, version)
        manifest = await self.origin.publish(folder, version, delta=True)
        kind = "full" if manifest.base is None else "delta"
        self.ledger.record_version(
            version, kind, manifest.base, manifest.payload_bytes, time.time()
        )
        self.version = version
        self.run_log.published(version)
        self._on_progress()
        await self._announce(version, manifest.base)
