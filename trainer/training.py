"""Training: take batches of validated groups, step, checkpoint, publish.

The ledger is the source of truth: a step's groups become trained in the same transaction
that records the step, after its checkpoint is on disk, so a crash at any moment loses no
accepted group and trains none twice. Versions are published through the SHARDCAST origin and
announced, signed, on gossip.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import trio

from protocol.poolspec import PoolSpec
from shardcast.origin import Origin
from trainer.algorithm import FLAT, GroupAlgorithm
from trainer.checkpoint import latest_committed, load_checkpoint, save_checkpoint
from trainer.config import AlgorithmSection
from trainer.grpo import GRPOTrainer, Sample, TrainGroup
from trainer.ledger import GroupRecord, Ledger
from trainer.metrics import RunLog
from trainer.policy import PolicyStore
from trainer.validator import GroupPayload
from trainer.view import Progress

log = logging.getLogger("swarmrl.training")


class TrainingService:
    def __init__(
        self,
        spec: PoolSpec,
        settings: AlgorithmSection,
        ledger: Ledger,
        trainer: GRPOTrainer,
        algorithm: GroupAlgorithm,
        policy: PolicyStore,
        tokenizer: Any,
        origin: Origin,
        run_log: RunLog,
        checkpoints: Path,
        announce: Callable[[int, int | None], Awaitable[None]],
        max_steps: int | None = None,
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.ledger = ledger
        self.trainer = trainer
        self.algorithm = algorithm
        self.policy = policy
        self.tokenizer = tokenizer
        self.origin = origin
        self.run_log = run_log
        self.checkpoints = checkpoints
        self._announce = announce
        self.max_steps = max_steps
        self.step, self.version = ledger.last_step()
        # Where this process picked up from the ledger: the API reports it so that anyone can
        # check a restart resumed at the committed step, even after training moved on.
        self.resumed_from = {"step": self.step, "version": self.version}
        self._flat_seen = ledger.dropped_since(FLAT, -1)[1]
        self._work = trio.Event()
        self.done = trio.Event()

    def progress(self) -> Progress:
        return Progress(self.step, self.version, dict(self.resumed_from))

    def restore(self) -> None:
        """Resume the model and optimizer from the checkpoint the ledger committed last."""
        ckpt = latest_committed(self.checkpoints, self.step)
        if ckpt is not None:
            load_checkpoint(
                ckpt, self.trainer.model, self.trainer.optimizer, self.trainer.scheduler
            )
            # The checkpoint holds the learning rate it was saved with; the config may have
            # changed it since (it is not part of the pool id), and the config wins.
            self.trainer.set_lr(self.settings.lr)
            log.info("resumed at step %d (version %d) from %s", self.step, self.version, ckpt.path)

    def wake(self) -> None:
        """New validated work arrived."""
        self._work.set()

    async def train_forever(self) -> None:
        b = self.settings.batch_prompts
        while self.max_steps is None or self.step < self.max_steps:
            n = self.step + 1
            min_version = n - self.spec.limits.max_staleness
            stale = self.ledger.drop_stale(min_version)
            if stale:
                log.info("dropped %d stale groups (older than v%d)", stale, min_version)
            chosen = self.ledger.trainable_groups(min_version, b)
            if len(chosen) < b:
                self._work = trio.Event()
                with trio.move_on_after(1.0):
                    await self._work.wait()
                continue
            await self._step(n, chosen, stale)
        self.done.set()

    async def _step(self, n: int, chosen: list[GroupRecord], stale: int) -> None:
        batch = self.algorithm.batch([self._train_group(g) for g in chosen])
        result = await trio.to_thread.run_sync(self.trainer.step, batch, n)
        flat, self._flat_seen = self.ledger.dropped_since(FLAT, self._flat_seen)
        metrics = {
            **result.metrics,
            "frac_reward_zero_std": flat / (flat + len(chosen)),
            "dropped_stale": float(stale),
        }
        await trio.to_thread.run_sync(self._checkpoint, n)
        changed = {
            g.group_id: g.advantages
            for g, stored in zip(batch, chosen, strict=True)
            if g.advantages != stored.advantages
        }
        self.ledger.commit_step(n, n, result.trained, metrics, time.time(), changed)
        self.step = n
        self.run_log.step_done(n, n, metrics)
        log.info(
            "step %d: reward %.3f, %d groups, %.1fs",
            n,
            metrics["reward_mean"],
            len(chosen),
            metrics["step_time_s"],
        )
        if n % self.settings.publish_every == 0:
            await self.ensure_published(n)

    def _train_group(self, g: GroupRecord) -> TrainGroup:
        p = msgspec.msgpack.decode(g.payload, type=GroupPayload)
        samples = [
            Sample(p.prompt_ids, t, lp, tr)
            for t, lp, tr in zip(p.tokens, p.logprobs, p.truncated, strict=True)
        ]
        # Groups accepted before the ledger stored advantages are scored now, once.
        advantages = g.advantages or self.algorithm.score(g.rewards).advantages
        return TrainGroup(samples, g.rewards, advantages, g.weight_version, g.id)

    def _checkpoint(self, step: int) -> None:
        save_checkpoint(
            self.checkpoints,
            step,
            step,
            self.trainer.model,
            self.trainer.optimizer,
            self.trainer.scheduler,
        )

    async def ensure_published(self, version: int) -> None:
        """Export `version` (the trainer's current weights) and publish it, if not done yet."""
        if version in self.origin.store.versions:
            self.version = max(self.version, version)
            return
        folder = await trio.to_thread.run_sync(
            self.policy.export, self.trainer.model, self.tokenizer, version
        )
        manifest = await self.origin.publish(folder, version, delta=True)
        kind = "full" if manifest.base is None else "delta"
        self.ledger.record_version(
            version, kind, manifest.base, manifest.payload_bytes, time.time()
        )
        self.version = version
        self.run_log.published(version)
        await self._announce(version, manifest.base)
