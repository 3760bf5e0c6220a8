"""TOPLOC activation proofs, hidden-state capture and seeded sampling checks.

Public API (see docs/toploc.md):

- `build_proofs(hidden, chunk_size=32, topk=128) -> list[bytes]`, `build_proofs_many([hidden,
  ...])` (several rollouts in one pass)
- `verify_proofs(hidden, proofs, chunk_size=32, topk=128, thresholds=...) -> list[ChunkVerdict]`,
  `verify_proofs_many([(hidden, proofs), ...])` (several rollouts in one pass)
- `sample(...)`, `verify_sampling(logits, tokens, seed, params) -> SamplingVerdict`,
  `verify_sampling_many([SamplingCase, ...], params)` (several rollouts in one pass),
  `verify_logprobs(...)`, `check_termination(...)`
- `capture_hf.generate(...)` / `capture_hf.prefill(...)`; `capture_vllm` for vLLM
- `models.load_model(name, dtype="float32", init_seed=0, device="cpu")`, `models.model_dir(name)`

Submodules import torch but not transformers until `models` or `capture_hf` is used.
"""

from toploc.proof import (
    CHUNK_SIZE,
    TOPK,
    P,
    ProofError,
    build_proofs,
    build_proofs_many,
    decode_proof,
)
from toploc.sampling import (
    LogprobVerdict,
    SamplingCase,
    SamplingParams,
    SamplingVerdict,
    check_termination,
    sample,
    token_logprobs,
    verify_logprobs,
    verify_sampling,
    verify_sampling_many,
)
from toploc.verify import (
    DEFAULT_THRESHOLDS,
    ChunkVerdict,
    Thresholds,
    all_ok,
    verify_proofs,
    verify_proofs_many,
)

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_THRESHOLDS",
    "TOPK",
    "ChunkVerdict",
    "LogprobVerdict",
    "P",
    "ProofError",
    "SamplingCase",
    "SamplingParams",
    "SamplingVerdict",
    "Thresholds",
    "all_ok",
    "build_proofs",
    "build_proofs_many",
    "check_termination",
    "decode_proof",
    "sample",
    "token_logprobs",
    "verify_logprobs",
    "verify_proofs",
    "verify_proofs_many",
    "verify_sampling",
    "verify_sampling_many",
]
