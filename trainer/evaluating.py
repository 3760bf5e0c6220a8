"""In-run evaluation: greedy accuracy, pass@1 and pass@k of published versions on the task's
held-out split, while training goes on (a multi-turn task plays whole episodes, and adds the
mean number of turns and the share of rewarded episodes: `trainer.evaluate`).

Every `eval_every` published versions, one evaluation runs in a worker thread on the first
`eval_prompts` held-out prompts (the same ones each time, so the numbers compare). It loads
the published version from its folder into a model of its own: the live training model is
never read across threads, and no trainer lock is held while it generates. While one is
running, the versions that come due are passed over rather than queued, so a slow evaluation
never piles up behind training; a failed one is logged and forgotten, never fatal.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import trio

from toploc.sampling import SamplingParams
from trainer.evaluate import evaluate
from trainer.metrics import RunLog
from trainer.policy import PolicyStore
from trainer.tasks import Task

log = logging.getLogger("swarmrl.evaluating")


class EvalService:
    def __init__(
        self,
        task: Task,
        tokenizer: Any,
        policy: PolicyStore,
        run_log: RunLog,
        every: int,
        prompts: int,
        k: int,
        sampling: SamplingParams,
        seed: int,
    ) -> None:
        self.task = task
        self.tokenizer = tokenizer
        self.policy = policy
        self.run_log = run_log
        self.every = every
        self.prompts = prompts
        self.k = k
        self.sampling = sampling
        self.seed = seed
        self.running: int | None = None
        """The version being evaluated, if any."""

    def due(self, version: int) -> bool:
        """Whether `version` should be evaluated now: on the cadence, and none in flight."""
        return (
            self.every > 0
            and version % self.every == 0
            and self.running is None
            and bool(self.task.test)
        )

    def start_if_due(self, version: int, nursery: trio.Nursery) -> bool:
        """Start evaluating `version` in `nursery` if it is due; returns whether it started."""
        if not self.due(version):
            return False
        self.running = version  # at once: a second call before the task runs finds it busy
        nursery.start_soon(self.run, version)
        return True

    async def run(self, version: int) -> dict[str, float] | None:
        """Evaluate `version` in a worker thread and log it; None when it could not be."""
        self.running = version
        try:
            # Abandoned on cancel: a shutdown does not wait for the evaluation to finish.
            metrics = await trio.to_thread.run_sync(self.evaluate, version, abandon_on_cancel=True)
        except Exception as e:  # an evaluation is a report: it never stops training
            log.warning("evaluation of v%d failed: %s", version, e)
            return None
        finally:
            self.running = None
        if metrics is not None:
            self.run_log.evaluated(version, metrics)
            log.info("eval v%d: %s", version, {k: round(v, 3) for k, v in metrics.items()})
        return metrics

    @torch.no_grad()
    def evaluate(self, version: int) -> dict[str, float] | None:
        """The metrics of published `version` (None when its folder is gone: pruned)."""
        model = self.policy.load(version)  # what nodes and validators load (LoRA merged)
        if model is None:
            log.info("v%d is no longer on disk: not evaluated", version)
            return None
        result = evaluate(
            model,
            self.tokenizer,
            self.task,
            "test",
            self.prompts,
            self.sampling.max_tokens,
            progress=False,
            k=self.k,
            sampling=self.sampling,
            seed=self.seed,
        )
        metrics = {
            "eval_accuracy": result["accuracy"],
            "eval_mean_reward": result["mean_reward"],
            "eval_prompts": float(result["n"]),
        }
        if self.task.environment is not None:
            metrics |= {
                "eval_mean_turns": result["mean_turns"],
                "eval_rewarded": result["rewarded"],
            }
        if self.k > 1:
            metrics.update(
                {
                    "eval_pass@1": result["pass@1"],
                    "eval_pass@k": result["pass@k"],
                    "eval_k": float(self.k),
                }
            )
        return metrics
