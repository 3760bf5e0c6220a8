"""Inference engines: turn a lease into proven completions.

Every engine samples with the seeded Gumbel-max sampler (`toploc.sampling`), captures the final-
norm rows that produced each token, and builds TOPLOC proofs from them, so the coordinator can
replay and check everything. Engines are blocking; the worker runs them in a thread.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import torch

import toploc
from protocol import messages as msg
from toploc.models import resolve_dtype
from toploc.sampling import SamplingParams
from toploc.versions import VersionLoader, adapter_meta


class Engine(Protocol):
    name: str
    version: int
    """The weight version loaded (-1 before any)."""

    def load(self, folder: Path, version: int) -> None: ...

    def generate(self, lease: msg.Lease) -> list[msg.TaskResult]: ...


def sampling_params(lease: msg.Lease) -> SamplingParams:
    s = lease.sampling
    return SamplingParams(
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        max_tokens=s.max_new_tokens,
        eos_token_ids=tuple(s.eos_token_ids),
    )


class HFEngine:
    """transformers with a KV cache, batched over the lease's prompts x G samples."""

    name = "hf"

    def __init__(self, device: str = "cpu", dtype: str | None = None, max_batch: int = 32) -> None:
        self.device = device
        # None: the dtype the coordinator published (the folder's config), which validators
        # recompute with; anything else fails validation unless it computes identically.
        self.dtype = resolve_dtype(dtype) if dtype else "auto"
        self.max_batch = max_batch
        self.model = None
        self._versions = VersionLoader(self.dtype, reuse_base=True)
        self.pad_token_id = 0
        self.version = -1
        self.seconds_generating = 0.0

    def load(self, folder: Path, version: int) -> None:
        from transformers import AutoTokenizer

        # The loader validators use too: adapter versions are merged onto their base bit for
        # bit as validators merge them, and the base stays loaded for the next version.
        model = self._versions.load(folder).to(self.device)
        if self.model is None or adapter_meta(folder) is None:  # adapters keep the tokenizer
            tokenizer = AutoTokenizer.from_pretrained(self._versions.config_folder)
            self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.model = model.eval()
        self.version = version

    @torch.no_grad()
    def generate(self, lease: msg.Lease) -> list[msg.TaskResult]:
        from toploc import capture_hf

        if self.model is None:
            raise RuntimeError("no weights loaded")
        params = sampling_params(lease)
        jobs = lease_jobs(lease)
        rollouts = []
        t0 = time.perf_counter()
        for start in range(0, len(jobs), self.max_batch):
            part = jobs[start : start + self.max_batch]
            rollouts += capture_hf.generate(
                self.model,
                [p for _, _, p, _ in part],
                params,
                [s for *_, s in part],
                sample_indices=[j for _, j, _, _ in part],
                pad_token_id=self.pad_token_id,
            )
        self.seconds_generating += time.perf_counter() - t0
        return prove(lease, jobs, rollouts)


def offline_lease(
    prompts: list[list[int]],
    *,
    group_size: int,
    max_new_tokens: int,
    eos_token_ids: list[int],
    first_seed: int = 0,
) -> msg.Lease:
    """An unsigned lease for running an engine outside a pool (benchmarks, tests): prompt i
    gets seed `first_seed + i`, plain sampling at temperature 1."""
    return msg.Lease(
        lease_id=1,
        node=bytes(32),
        counter=0,
        weight_version=0,
        min_version=0,
        tasks=[
            msg.LeaseTask(
                prompt_index=i, prompt_ids=ids, seed=first_seed + i, group_size=group_size
            )
            for i, ids in enumerate(prompts)
        ],
        sampling=msg.SamplingWire(
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_ids=eos_token_ids,
        ),
        deadline_ms=2**62,
    )


def lease_jobs(lease: msg.Lease) -> list[tuple[int, int, list[int], int]]:
    """(task index, sample index, prompt ids, seed) for every completion a lease asks for."""
    return [
        (t, j, list(task.prompt_ids), task.seed)
        for t, task in enumerate(lease.tasks)
        for j in range(task.group_size)
    ]


def prove(lease: msg.Lease, jobs: list, rollouts: list) -> list[msg.TaskResult]:
    """Proofs for each rollout, assembled into the lease's results (in task order)."""
    proofs = toploc.build_proofs_many([r.hidden for r in rollouts])
    done = {
        (t, j): msg.Completion(
            tokens=r.completion_ids,
            logprobs=r.logprobs,
            finish_reason=r.finish_reason,
            proofs=p,
        )
        for (t, j, _, _), r, p in zip(jobs, rollouts, proofs, strict=True)
    }
    return [
        msg.TaskResult(task_index=t, completions=[done[(t, j)] for j in range(task.group_size)])
        for t, task in enumerate(lease.tasks)
    ]


def make_engine(name: str, device: str, max_batch: int, dtype: str | None = None) -> Engine:
    if name == "hf":
        return HFEngine(device, dtype, max_batch)
    if name == "vllm":
        from node.engine_vllm import VLLMEngine

        return VLLMEngine(device, dtype, max_batch)
    raise ValueError(f"unknown engine {name!r}: use hf or vllm")
