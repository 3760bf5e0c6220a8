"""Validation of a recorded submission: checks 3 to 10 of the pipeline (ARCHITECTURE.md).

Checks 1 and 2 (envelope and lease) run when the submission arrives, before the ledger records
it; what reaches here is signed by a joined node and answers one of its open leases. The order
is cheap first: staleness and structure need no model; then one prefill per submission feeds
the TOPLOC, sampling and logprob checks; rewards are computed last, from the coordinator's own
copy of the prompt and the task's reference columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import torch
from transformers import PreTrainedModel

import toploc
from protocol.messages import Submission
from protocol.poolspec import PoolSpec
from toploc import capture_hf
from toploc.sampling import SamplingParams
from trainer.rewards import score
from trainer.tasks import Task

Outcome = Literal["accept", "soft", "hard"]


class GroupPayload(msgspec.Struct, frozen=True):
    """What the trainer needs of an accepted group, stored in the ledger."""

    prompt_ids: list[int]
    tokens: list[list[int]]
    logprobs: list[list[float]]
    """Recomputed by the validator (the node's own values passed the tolerance check)."""
    truncated: list[bool]


@dataclass
class AcceptedGroup:
    task_index: int
    prompt_index: int
    weight_version: int
    rewards: list[float]
    per_func: dict[str, list[float | None]]
    completions: list[str]
    payload: GroupPayload


@dataclass
class Verdict:
    outcome: Outcome
    reason: str
    check: str
    """The deciding check: staleness, structure, toploc, sampling, termination, logprobs,
    or reward (an accepted submission)."""
    details: dict[str, Any] = field(default_factory=dict)
    groups: list[AcceptedGroup] = field(default_factory=list)


@dataclass(frozen=True)
class LeaseView:
    """The coordinator's own copy of the lease being answered."""

    tasks: list[dict[str, Any]]
    """Each: prompt_index, prompt_ids, seed, group_size."""
    min_version: int
    sampling: SamplingParams


class Validator:
    def __init__(
        self,
        spec: PoolSpec,
        task: Task,
        tokenizer: Any,
        model_for_version: Callable[[int], PreTrainedModel | None],
        vocab_size: int,
        pad_token_id: int,
    ) -> None:
        self.spec = spec
        self.task = task
        self.tokenizer = tokenizer
        self.model_for_version = model_for_version
        self.vocab_size = vocab_size
        self.pad_token_id = pad_token_id
        v = spec.verification
        self.thresholds = toploc.Thresholds(
            max_exp_mismatches=v.toploc_max_exp_mismatches,
            max_mant_err_mean=v.toploc_max_mant_err_mean,
            max_mant_err_median=v.toploc_max_mant_err_median,
        )

    def validate(self, submission: Submission, lease: LeaseView, current_version: int) -> Verdict:
        if verdict := self._staleness(submission, lease, current_version):
            return verdict
        if verdict := self._structure(submission, lease):
            return verdict
        model = self.model_for_version(submission.weight_version)
        if model is None:
            return Verdict(
                "soft",
                f"weights of version {submission.weight_version} are no longer held",
                "staleness",
            )
        rollouts = [
            (task_result.task_index, j, completion)
            for task_result in submission.results
            for j, completion in enumerate(task_result.completions)
        ]
        prompts = [lease.tasks[t]["prompt_ids"] for t, _, _ in rollouts]
        recomputed = capture_hf.prefill(
            model, prompts, [c.tokens for _, _, c in rollouts], pad_token_id=self.pad_token_id
        )
        recomputed_logprobs: dict[tuple[int, int], list[float]] = {}
        for (t, j, completion), pre in zip(rollouts, recomputed, strict=True):
            where = {"task": t, "sample": j}
            chunks = toploc.verify_proofs(
                pre.hidden, list(completion.proofs), thresholds=self.thresholds
            )
            bad = [c for c in chunks if not c.ok]
            if bad:
                return Verdict(
                    "hard",
                    f"TOPLOC proof rejected: {bad[0].reason}",
                    "toploc",
                    {
                        **where,
                        "chunk": bad[0].chunk,
                        "bad_chunks": len(bad),
                        "chunks": len(chunks),
                        "exp_mismatches": bad[0].exp_mismatches,
                        "mant_err_mean": _num(bad[0].mant_err_mean),
                        "mant_err_median": _num(bad[0].mant_err_median),
                    },
                )
            sampled = toploc.verify_sampling(
                pre.logits,
                completion.tokens,
                lease.tasks[t]["seed"],
                lease.sampling,
                sample_index=j,
                tolerance=self.spec.verification.sampling_tolerance or None,
                max_violations=self.spec.verification.sampling_max_violations,
            )
            if not sampled.ok:
                check = "termination" if not sampled.termination_ok else "sampling"
                return Verdict(
                    "hard",
                    f"sampling check failed: {sampled.reason}",
                    check,
                    {
                        **where,
                        "violations": sampled.violations,
                        "positions": sampled.violating_positions[:8],
                        "worst_gap": _num(sampled.worst_gap),
                    },
                )
            if (completion.finish_reason == "stop") != (
                completion.tokens[-1] in lease.sampling.eos_token_ids
            ):
                return Verdict(
                    "hard",
                    f"finish reason {completion.finish_reason!r} does not match the tokens",
                    "termination",
                    where,
                )
            lp = toploc.verify_logprobs(
                pre.logits,
                completion.tokens,
                completion.logprobs,
                lease.sampling,
                tolerance=self.spec.verification.logprob_tolerance or None,
            )
            if not lp.ok:
                return Verdict(
                    "hard",
                    f"logprobs do not match: {lp.reason}",
                    "logprobs",
                    {
                        **where,
                        "max_abs_err": _num(lp.max_abs_err),
                        "positions": lp.bad_positions[:8],
                    },
                )
            recomputed_logprobs[(t, j)] = toploc.token_logprobs(
                pre.logits, torch.tensor(completion.tokens), lease.sampling.temperature
            ).tolist()
        return Verdict(
            "accept",
            "ok",
            "reward",
            {"rollouts": len(rollouts)},
            groups=[
                self._reward(task_result, lease, submission.weight_version, recomputed_logprobs)
                for task_result in submission.results
            ],
        )

    def _staleness(self, sub: Submission, lease: LeaseView, current: int) -> Verdict | None:
        lag = current - sub.weight_version
        if sub.weight_version > current:
            return Verdict(
                "hard",
                f"claims version {sub.weight_version}, newer than the trainer's {current}",
                "staleness",
            )
        if sub.weight_version < lease.min_version:
            # The lease was only issued to a node holding min_version or newer, and nodes
            # never go back a version: older content was made for some other lease (a replay).
            return Verdict(
                "hard",
                f"claims version {sub.weight_version}, older than v{lease.min_version}, "
                "the oldest this lease allowed",
                "staleness",
                {"lag": lag},
            )
        if lag > self.spec.limits.max_staleness:
            # The trainer moved on while an honest node worked: the work is just not used.
            return Verdict(
                "soft",
                f"version {sub.weight_version} is {lag} behind the trainer's {current} "
                f"(max staleness {self.spec.limits.max_staleness})",
                "staleness",
                {"lag": lag},
            )
        return None

    def _structure(self, sub: Submission, lease: LeaseView) -> Verdict | None:
        def bad(reason: str) -> Verdict:
            return Verdict("hard", f"malformed submission: {reason}", "structure")

        indices = sorted(r.task_index for r in sub.results)
        if indices != list(range(len(lease.tasks))):
            return bad(f"results for tasks {indices[:8]}, the lease has {len(lease.tasks)}")
        cap = lease.sampling.max_tokens
        for r in sub.results:
            g = lease.tasks[r.task_index]["group_size"]
            if len(r.completions) != g:
                return bad(f"task {r.task_index} has {len(r.completions)} completions, not {g}")
            for j, c in enumerate(r.completions):
                n = len(c.tokens)
                where = f"task {r.task_index} sample {j}"
                if not 1 <= n <= cap:
                    return bad(f"{where} has {n} tokens (1 to {cap} allowed)")
                if min(c.tokens) < 0 or max(c.tokens) >= self.vocab_size:
                    return bad(f"{where} has a token id outside the vocabulary")
                if len(c.logprobs) != n:
                    return bad(f"{where} has {len(c.logprobs)} logprobs for {n} tokens")
                if not all(math.isfinite(x) and x <= 0 for x in c.logprobs):
                    return bad(f"{where} has a logprob that is not a finite number <= 0")
                chunks = -(-n // toploc.CHUNK_SIZE)
                if len(c.proofs) != chunks:
                    return bad(f"{where} has {len(c.proofs)} proofs for {chunks} chunks")
        return None

    def _reward(
        self, r: Any, lease: LeaseView, version: int, logprobs: dict[tuple[int, int], list[float]]
    ) -> AcceptedGroup:
        spec_task = lease.tasks[r.task_index]
        example = self.task.train[spec_task["prompt_index"]]
        texts = [self.tokenizer.decode(c.tokens, skip_special_tokens=True) for c in r.completions]
        g = len(texts)
        totals, per_func = score(
            self.task.rewards,
            [example.prompt] * g,
            texts,
            {k: [v] * g for k, v in example.columns.items()},
        )
        payload = GroupPayload(
            prompt_ids=list(spec_task["prompt_ids"]),
            tokens=[list(c.tokens) for c in r.completions],
            logprobs=[logprobs[(r.task_index, j)] for j in range(g)],
            truncated=[c.finish_reason == "length" for c in r.completions],
        )
        return AcceptedGroup(
            r.task_index, spec_task["prompt_index"], version, totals, per_func, texts, payload
        )


def _num(x: float) -> float | None:
    """JSON has no infinity: report it as None."""
    return x if math.isfinite(x) else None
