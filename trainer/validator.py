"""Validation of a recorded submission: checks 3 to 10 of the pipeline (ARCHITECTURE.md).

Checks 1 and 2 (envelope and lease) run when the submission arrives, before the ledger records
it; what reaches here is signed by a joined node and answers one of its open leases. The order
is cheap first: staleness and structure need no model; then a padded prefill, shared by every
submission of the batch that claims the same version, feeds the TOPLOC, sampling and logprob
checks; rewards are computed last, from the coordinator's own copy of the prompt and the task's
reference columns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import msgspec
import torch
from transformers import PreTrainedModel

import toploc
from protocol.envelope import Envelope
from protocol.environments import reply_tokens
from protocol.messages import Completion, Lease, Submission
from protocol.poolspec import PoolSpec
from protocol.transcript import TranscriptError, model_positions, split_segments, turn_seed
from protocol.wire import decode
from toploc import capture_hf
from toploc.sampling import SamplingParams
from trainer.rewards import score, score_games
from trainer.tasks import Task

Outcome = Literal["accept", "soft", "hard"]
Backend = Literal["hf", "vllm"]
_T = TypeVar("_T")
PrefillFn = Callable[
    [PreTrainedModel, Sequence[Sequence[int]], Sequence[Sequence[int]], int],
    list[capture_hf.Prefill],
]
"""(model, prompts, completions, pad token id) -> each rollout's rows and logits."""

MAX_PREFILL_BYTES = 1 << 30
"""Logits one batched prefill may hold (rows x longest completion x vocabulary x dtype size);
a single rollout is prefilled whatever its size."""


class GroupPayload(msgspec.Struct, frozen=True):
    """What the trainer needs of an accepted group, stored in the ledger."""

    prompt_ids: list[int]
    tokens: list[list[int]]
    logprobs: list[list[float]]
    """Recomputed by the validator (the node's own values passed the tolerance check)."""
    truncated: list[bool]
    segments: list[list[int]] = []
    """Multi-turn: each sample's model / environment segment lengths (`protocol.transcript`);
    `tokens` then hold the whole transcript and `logprobs` one value per transcript token, and
    only the model's segments may carry loss. Empty for a single-turn task."""


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
    """The deciding check: staleness, structure, environment, toploc, sampling, termination,
    logprobs, or reward (an accepted submission)."""
    details: dict[str, Any] = field(default_factory=dict)
    groups: list[AcceptedGroup] = field(default_factory=list)


@dataclass(frozen=True)
class LeaseView:
    """The coordinator's own copy of the lease being answered."""

    tasks: list[dict[str, Any]]
    """Each: prompt_index, prompt_ids, seed, group_size."""
    min_version: int
    sampling: SamplingParams

    @classmethod
    def of(cls, lease: Lease, sampling: SamplingParams) -> LeaseView:
        """The view of a lease message (tools and benchmarks that issue their own leases)."""
        tasks = [
            {
                "prompt_index": t.prompt_index,
                "prompt_ids": list(t.prompt_ids),
                "seed": t.seed,
                "group_size": t.group_size,
            }
            for t in lease.tasks
        ]
        return cls(tasks=tasks, min_version=lease.min_version, sampling=sampling)


@dataclass(frozen=True)
class Job:
    """A recorded submission as the ledger holds it: plain data, so a worker process can take
    it (the decoding happens where the validation does)."""

    submission_id: int
    raw: bytes
    """The signed envelope, as received."""
    lease_tasks: list[dict[str, Any]]
    lease_body: bytes
    """The lease as signed and sent to the node."""


@dataclass
class Checked:
    verdict: Verdict
    version: int
    """The weight version the submission claims."""
    seconds: float
    """What validating it cost: its own checks plus its tokens' share of the batch's prefill."""


@dataclass
class _Row:
    """One rollout of a batch: which item, task and sample it is."""

    item: int
    task: int
    sample: int
    completion: Completion
    prompt_ids: list[int]

    @property
    def tokens(self) -> int:
        """Prefilled positions: prompt + completion - 1."""
        return len(self.prompt_ids) + len(self.completion.tokens) - 1


class Validator:
    def __init__(
        self,
        spec: PoolSpec,
        task: Task,
        tokenizer: Any,
        model_for_version: Callable[[int], PreTrainedModel | None],
        vocab_size: int,
        pad_token_id: int,
        max_prefill_bytes: int = MAX_PREFILL_BYTES,
        backend: Backend = "hf",
    ) -> None:
        """`backend`: what recomputes the rows and logits (`prefill_backend`)."""
        self.spec = spec
        self.task = task
        self.tokenizer = tokenizer
        self.model_for_version = model_for_version
        self.vocab_size = vocab_size
        self.pad_token_id = pad_token_id
        self.max_prefill_bytes = max_prefill_bytes
        self.backend = backend
        self.prefill = prefill_backend(backend, tokenizer)
        v = spec.verification
        self.thresholds = toploc.Thresholds(
            max_exp_mismatches=v.toploc_max_exp_mismatches,
            max_mant_err_mean=v.toploc_max_mant_err_mean,
            max_mant_err_median=v.toploc_max_mant_err_median,
        )

    def validate(self, submission: Submission, lease: LeaseView, current_version: int) -> Verdict:
        """One submission's verdict (`validate_batch` of one)."""
        return self.validate_batch([(submission, lease)], current_version)[0][0]

    def validate_jobs(
        self, jobs: Sequence[Job], sampling: SamplingParams, current_version: int
    ) -> list[Checked]:
        """Verdicts on recorded submissions (one per job, in order), batched."""
        items = []
        for job in jobs:
            env = decode(job.raw, Envelope, max_bytes=len(job.raw))
            submission = decode(env.body, Submission)
            signed = msgspec.msgpack.decode(job.lease_body, type=Lease)  # what the node was sent
            view = LeaseView(
                tasks=job.lease_tasks, min_version=signed.min_version, sampling=sampling
            )
            items.append((submission, view))
        verdicts = self.validate_batch(items, current_version)
        return [
            Checked(verdict, submission.weight_version, seconds)
            for (verdict, seconds), (submission, _) in zip(verdicts, items, strict=True)
        ]

    def validate_batch(
        self, items: Sequence[tuple[Submission, LeaseView]], current_version: int
    ) -> list[tuple[Verdict, float]]:
        """Verdicts and the seconds each cost, for several submissions: the model-free checks
        one by one, then one padded prefill per version over every rollout that passed them
        (split only where the logits would outgrow `max_prefill_bytes`). A submission's
        verdict does not depend on what it was batched with: the checks read only its own
        rows, and padding changes them by far less than the tolerances (tests compare)."""
        verdicts: list[Verdict | None] = []
        seconds = [0.0] * len(items)
        by_version: dict[int, list[int]] = {}
        for i, (submission, lease) in enumerate(items):
            t0 = time.perf_counter()
            verdict = (
                self._staleness(submission, lease, current_version)
                or self._structure(submission, lease)
                or self._environment(submission, lease)
            )
            seconds[i] += time.perf_counter() - t0
            verdicts.append(verdict)
            if verdict is None:
                by_version.setdefault(submission.weight_version, []).append(i)
        for version, members in by_version.items():
            t0 = time.perf_counter()
            model = self.model_for_version(version)
            if model is None:
                for i in members:
                    verdicts[i] = Verdict(
                        "soft", f"weights of version {version} are no longer held", "staleness"
                    )
                continue
            rows = {
                i: [
                    _Row(i, t.task_index, j, c, items[i][1].tasks[t.task_index]["prompt_ids"])
                    for t in items[i][0].results
                    for j, c in enumerate(t.completions)
                ]
                for i in members
            }
            loaded = time.perf_counter() - t0
            total = sum(r.tokens for i in members for r in rows[i])
            for i in members:  # loading the version is shared like the prefill: by tokens
                seconds[i] += loaded * sum(r.tokens for r in rows[i]) / total
            for group in self._groups(members, rows, model.dtype.itemsize):
                # Recomputed logits are held only for one group of submissions at a time.
                prefills = iter(self._prefill(model, [r for i in group for r in rows[i]], seconds))
                for i in group:
                    t0 = time.perf_counter()
                    mine = [(r, next(prefills)) for r in rows[i]]
                    verdicts[i] = self._check(items[i][0], items[i][1], mine)
                    seconds[i] += time.perf_counter() - t0
        return [(_decided(v), s) for v, s in zip(verdicts, seconds, strict=True)]

    def _logit_bytes(self, rows: list[_Row], itemsize: int) -> int:
        """Rows x longest completion x vocabulary: what a padded prefill of `rows` returns."""
        return len(rows) * max(len(r.completion.tokens) for r in rows) * self.vocab_size * itemsize

    def _prefill_bytes(self, rows: list[_Row], itemsize: int) -> int:
        """What a padded prefill of `rows` holds at its peak: its logits, and the attention
        masks the model builds, rows x length^2 entries of about 4 bytes plus the model's
        dtype each (measured on CPU sdpa: 8 in float32). Counting logits alone, 8 completions
        of 4,096 tokens of the tiny model held 1 GB for 7 MB of logits, in one batch."""
        length = max(r.tokens for r in rows) + 1
        masks = len(rows) * length * length * (4 + itemsize)
        return self._logit_bytes(rows, itemsize) + masks

    def _groups(
        self, members: list[int], rows: dict[int, list[_Row]], itemsize: int
    ) -> list[list[int]]:
        """Consecutive submissions whose logits fit `max_prefill_bytes` together (a larger one
        on its own)."""
        groups: list[list[int]] = []
        for i in members:
            joined = [r for j in groups[-1] for r in rows[j]] + rows[i] if groups else []
            if joined and self._logit_bytes(joined, itemsize) <= self.max_prefill_bytes:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def _prefill(
        self,
        model: PreTrainedModel,
        rows: list[_Row],
        seconds: list[float],
    ) -> list[capture_hf.Prefill]:
        """Prefills of `rows` (in their order), in padded batches of similar lengths; each
        batch's seconds go to its rows' submissions in proportion to their tokens."""
        order = sorted(range(len(rows)), key=lambda k: rows[k].tokens)
        itemsize = model.dtype.itemsize
        out: list[capture_hf.Prefill | None] = [None] * len(rows)
        start = 0
        while start < len(order):
            end = start + 1  # the batch grows while its logits fit
            while end < len(order) and (
                self._prefill_bytes([rows[k] for k in order[start : end + 1]], itemsize)
                <= self.max_prefill_bytes
            ):
                end += 1
            part = order[start:end]
            t0 = time.perf_counter()
            done = self.prefill(
                model,
                [rows[k].prompt_ids for k in part],
                [rows[k].completion.tokens for k in part],
                self.pad_token_id,
            )
            spent = time.perf_counter() - t0
            total = sum(rows[k].tokens for k in part)
            for k, pre in zip(part, done, strict=True):
                out[k] = pre
                seconds[rows[k].item] += spent * rows[k].tokens / total
            start = end
        return [_decided(p) for p in out]

    def _check(
        self,
        submission: Submission,
        lease: LeaseView,
        rollouts: list[tuple[_Row, capture_hf.Prefill]],
    ) -> Verdict:
        """TOPLOC, sampling, termination and logprobs of each rollout in order (the first
        failure decides), then rewards."""
        recomputed_logprobs: dict[tuple[int, int], list[float]] = {}
        turns_of = [
            self._model_turns(r.completion, lease.tasks[r.task]["seed"]) for r, _ in rollouts
        ]
        # The seeded sampler's replay of every model turn of every rollout in one pass, and
        # every rollout's TOPLOC proofs in another; the verdicts are read below in the order
        # the checks have always run (the first failure decides).
        sampling = iter(
            toploc.verify_sampling_many(
                [
                    toploc.SamplingCase(
                        pre.logits if turn_rows is None else pre.logits[turn_rows],
                        tokens,
                        seed,
                        row.sample,
                    )
                    for (row, pre), (_, turns) in zip(rollouts, turns_of, strict=True)
                    for turn_rows, tokens, seed in turns
                ],
                lease.sampling,
                tolerance=self.spec.verification.sampling_tolerance or None,
                max_violations=self.spec.verification.sampling_max_violations,
            )
        )
        # Only the model's tokens were sampled and proven; environment tokens were checked
        # by the replay before the prefill.
        proofs = toploc.verify_proofs_many(
            [
                (pre.hidden if rows is None else pre.hidden[rows], list(row.completion.proofs))
                for (row, pre), (rows, _) in zip(rollouts, turns_of, strict=True)
            ],
            thresholds=self.thresholds,
        )
        for (row, pre), (rows, turns), chunks in zip(rollouts, turns_of, proofs, strict=True):
            t, j, completion = row.task, row.sample, row.completion
            where = {"task": t, "sample": j}
            logits = pre.logits if rows is None else pre.logits[rows]
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
            for k in range(len(turns)):
                sampled = next(sampling)
                if not sampled.ok:
                    check = "termination" if not sampled.termination_ok else "sampling"
                    return Verdict(
                        "hard",
                        f"sampling check failed: {sampled.reason}",
                        check,
                        {
                            **where,
                            **({"turn": k} if completion.segments else {}),
                            "violations": sampled.violations,
                            "positions": sampled.violating_positions[:8],
                            "worst_gap": _num(sampled.worst_gap),
                        },
                    )
            model_tokens = [x for _, tokens, _ in turns for x in tokens]
            if (completion.finish_reason == "stop") != (
                model_tokens[-1] in lease.sampling.eos_token_ids
            ):
                return Verdict(
                    "hard",
                    f"finish reason {completion.finish_reason!r} does not match the tokens",
                    "termination",
                    where,
                )
            # Every transcript token gets a value (the trainer's layout); only the model's
            # segments train, and only theirs were reported.
            every = toploc.token_logprobs(
                pre.logits, torch.tensor(completion.tokens), lease.sampling.temperature
            )
            lp = toploc.verify_logprobs(
                logits,
                model_tokens,
                completion.logprobs,
                lease.sampling,
                tolerance=self.spec.verification.logprob_tolerance or None,
                recomputed=every if rows is None else every[rows],
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
            recomputed_logprobs[(t, j)] = every.tolist()
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

    def _model_turns(
        self, completion: Completion, seed: int
    ) -> tuple[torch.Tensor | None, list[tuple[torch.Tensor | None, list[int], int]]]:
        """Which prefill rows hold the model's tokens (None: all, a single-turn completion),
        and each model turn's rows, tokens and sampling seed. Structure has been checked."""
        if not completion.segments:
            return None, [(None, list(completion.tokens), seed)]
        segments = split_segments(completion.tokens, completion.segments)
        turns = [s for s in segments if s.by_model]
        return torch.tensor(model_positions(segments)), [
            (torch.arange(s.start, s.start + len(s.tokens)), s.tokens, turn_seed(seed, k))
            for k, s in enumerate(turns)
        ]

    def _environment(self, sub: Submission, lease: LeaseView) -> Verdict | None:
        """Replays the environment after every model turn and compares its replies with the
        transcript's, token for token: a faked, edited or missing reply, or a turn the
        environment did not ask for, is a hard reject. Costs one environment step per turn,
        bounded by the task's turn limit (structure checked it)."""
        env = self.task.environment
        if env is None:
            return None
        for r in sub.results:
            spec_task = lease.tasks[r.task_index]
            for j, c in enumerate(r.completions):
                segments = split_segments(c.tokens, c.segments)
                turns = [s.tokens for s in segments if s.by_model]
                replies = [s.tokens for s in segments if not s.by_model]
                where = {"task": r.task_index, "sample": j}
                for k in range(len(turns)):
                    try:
                        expected = reply_tokens(
                            env,
                            self.tokenizer,
                            spec_task["seed"],
                            spec_task["prompt_ids"],
                            turns[: k + 1],
                        )
                    except (
                        Exception
                    ) as e:  # environment code (a plugin) failing is not the node's fault
                        return Verdict(
                            "soft",
                            f"the environment failed on turn {k}: {type(e).__name__}",
                            "environment",
                            {**where, "turn": k},
                        )
                    got = replies[k] if k < len(replies) else None
                    if got != expected:
                        return Verdict(
                            "hard",
                            f"transcript disagrees with the environment after turn {k}: "
                            + _mismatch(expected, got),
                            "environment",
                            {**where, "turn": k},
                        )
        return None

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
        if sub.weight_version < self.spec.limits.oldest_trainable(current):
            # The trainer moved on while an honest node worked: the work is just not used.
            return Verdict(
                "soft",
                f"version {sub.weight_version} is {lag} behind the trainer's {current}: the "
                f"next step trains v{self.spec.limits.oldest_trainable(current)} or newer "
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
                where = f"task {r.task_index} sample {j}"
                try:
                    n = self._model_token_count(c, cap)
                except TranscriptError as e:
                    return bad(f"{where}: {e}")
                if min(c.tokens) < 0 or max(c.tokens) >= self.vocab_size:
                    return bad(f"{where} has a token id outside the vocabulary")
                if len(c.logprobs) != n:
                    return bad(f"{where} has {len(c.logprobs)} logprobs for {n} model tokens")
                if not all(math.isfinite(x) and x <= 0 for x in c.logprobs):
                    return bad(f"{where} has a logprob that is not a finite number <= 0")
                chunks = -(-n // toploc.CHUNK_SIZE)
                if len(c.proofs) != chunks:
                    return bad(f"{where} has {len(c.proofs)} proofs for {chunks} chunks")
        return None

    def _model_token_count(self, c: Completion, cap: int) -> int:
        """How many of the completion's tokens the model generated; raises `TranscriptError`
        when its length or layout is not what the task allows."""
        env = self.task.environment
        if env is None:
            if c.segments:
                raise TranscriptError("segments sent for a single-turn task")
            if not 1 <= len(c.tokens) <= cap:
                raise TranscriptError(f"{len(c.tokens)} tokens (1 to {cap} allowed)")
            return len(c.tokens)
        limit = env.limits.max_transcript_tokens(cap)
        if not 1 <= len(c.tokens) <= limit:
            raise TranscriptError(f"a transcript of {len(c.tokens)} tokens (1 to {limit} allowed)")
        segments = split_segments(c.tokens, c.segments)
        turns = [s for s in segments if s.by_model]
        if len(turns) > env.limits.max_turns:
            raise TranscriptError(f"{len(turns)} model turns (at most {env.limits.max_turns})")
        if any(len(s.tokens) > cap for s in turns):
            raise TranscriptError(f"a model turn longer than {cap} tokens")
        if any(len(s.tokens) > env.limits.max_reply_tokens for s in segments if not s.by_model):
            raise TranscriptError(f"a reply longer than {env.limits.max_reply_tokens} tokens")
        return sum(len(s.tokens) for s in turns)

    def _reward(
        self, r: Any, lease: LeaseView, version: int, logprobs: dict[tuple[int, int], list[float]]
    ) -> AcceptedGroup:
        spec_task = lease.tasks[r.task_index]
        example = self.task.train[spec_task["prompt_index"]]
        texts = [self.tokenizer.decode(c.tokens, skip_special_tokens=True) for c in r.completions]
        g = len(texts)
        columns = {k: [v] * g for k, v in example.columns.items()}
        prompts = [example.prompt] * g
        if self.task.environment is None:
            totals, per_func = score(self.task.rewards, prompts, texts, columns)
        else:
            turns = [
                [
                    self.tokenizer.decode(s.tokens, skip_special_tokens=True)
                    for s in segs
                    if s.by_model
                ]
                for segs in (split_segments(c.tokens, c.segments) for c in r.completions)
            ]
            seeds = [spec_task["seed"]] * g
            totals, per_func = score_games(self.task.rewards, prompts, turns, seeds, columns)
        payload = GroupPayload(
            prompt_ids=list(spec_task["prompt_ids"]),
            tokens=[list(c.tokens) for c in r.completions],
            logprobs=[logprobs[(r.task_index, j)] for j in range(g)],
            truncated=[c.finish_reason == "length" for c in r.completions],
            segments=[list(c.segments) for c in r.completions if c.segments],
        )
        return AcceptedGroup(
            r.task_index, spec_task["prompt_index"], version, totals, per_func, texts, payload
        )


def prefill_backend(name: Backend, tokenizer: Any) -> PrefillFn:
    """`[trainer] validator_backend`: "hf" prefills with the version's HF model (a padded
    batch); "vllm" with vLLM (`toploc.prefill_vllm`), refused with `VllmUnavailable` where vLLM
    is not installed."""
    if name == "hf":
        return _hf_prefill
    from toploc.prefill_vllm import VllmPrefill

    return VllmPrefill(tokenizer)


def _hf_prefill(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_token_id: int,
) -> list[capture_hf.Prefill]:
    # Looked up per call, not bound once: tests count the prefills by patching the module.
    return capture_hf.prefill(model, prompts, completions, pad_token_id=pad_token_id)


def _mismatch(expected: list[int] | None, got: list[int] | None) -> str:
    """Why a transcript's environment segment differs from the replay, for people."""
    if expected is None:
        return "the transcript goes on where the environment ended the rollout"
    if got is None:
        return "the transcript stops where the environment replied (a skipped turn)"
    at = next(
        (i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
        min(len(expected), len(got)),
    )
    return f"its reply differs from the environment's at token {at}"


def _decided(x: _T | None) -> _T:
    """Every slot is filled by the time this is called; a None is a bug here, not bad input."""
    if x is None:
        raise RuntimeError("validator bug: an item was left without a result")
    return x


def _num(x: float) -> float | None:
    """JSON has no infinity: report it as None."""
    return x if math.isfinite(x) else None
