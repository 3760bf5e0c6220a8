"""The `vllm` validation backend: the validator's prefill (`capture_hf.Prefill`) run by vLLM.

Each rollout's prompt + completion[:-1] is one vLLM request with max_tokens=1, and
`capture_vllm.prefill_rows` hooks the model to keep the final-norm row of every position. The
completion positions' logits are then computed here from those rows with the LM head of the
version's HF model (the one the policy store loaded), over the whole vocabulary: the sampling
replay needs every logit, which vLLM's prompt logprobs would not give.

vLLM is given the HF model's weights, so what it computes is the version the store loaded,
LoRA adapters merged, exactly as nodes get it: in place into the running engine where the
backend allows, otherwise (vLLM's CPU build repacks its linear weights) by rebuilding the engine
from the weights saved to a temporary folder. Chunked prefill is off: a request is prefilled
whole in one step, which is what lets the capture tell the requests of a step apart.
NOT RUN HERE: loading in place has no CPU test (the CPU build always rebuilds); its test is the
cuda twin in tests/trainer/test_validator_vllm.py (`gpu`, `vllm` marks, scripts/gpu_check.sh).
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from protocol.errors import SwarmError
from toploc.capture_hf import Prefill

log = logging.getLogger("swarmrl.toploc.prefill_vllm")


class VllmUnavailable(SwarmError):
    """The `vllm` validator backend was chosen where vLLM is not installed."""


def require_vllm() -> None:
    """Raise `VllmUnavailable` unless vLLM can be imported here."""
    if importlib.util.find_spec("vllm") is None:
        raise VllmUnavailable(
            'validator_backend = "vllm" needs vLLM in this Python environment: install '
            "'swarmrl[vllm]' on a CUDA machine (scripts/setup.sh puts the CPU build in "
            '.venv-vllm), or use validator_backend = "hf"'
        )


class VllmPrefill:
    """A `Validator` prefill function backed by one vLLM engine, holding one version at a
    time (the last model it was called with)."""

    def __init__(self, tokenizer: Any, max_model_len: int | None = None, **engine: Any) -> None:
        """`tokenizer`: the pool's (saved beside each version's weights: vLLM's engine loads
        one); `max_model_len`: the longest prompt + completion (default: the model's own
        limit); `engine`: further options for `vllm.LLM`."""
        require_vllm()
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.engine = engine
        self.llm: Any = None
        self.model: PreTrainedModel | None = None
        """The model whose weights the engine holds (kept so its identity stays unique)."""
        self.in_place = True
        """Load a new version into the running engine; off once the backend refuses."""

    def __call__(
        self,
        model: PreTrainedModel,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        pad_token_id: int = 0,
    ) -> list[Prefill]:
        """Like `capture_hf.prefill` (no padding here: `pad_token_id` is not used)."""
        from toploc.capture_vllm import prefill_rows

        if len(prompts) != len(completions) or any(len(c) == 0 for c in completions):
            raise ValueError("one completion of at least one token per prompt")
        self._hold(model)
        seqs = [list(p) + list(c)[:-1] for p, c in zip(prompts, completions, strict=True)]
        rows = prefill_rows(self.llm, seqs)
        hidden = [r[len(r) - len(c) :] for r, c in zip(rows, completions, strict=True)]
        logits = _lm_head(model, torch.cat(hidden)).split([len(c) for c in completions])
        return [Prefill(hidden=h, logits=z) for h, z in zip(hidden, logits, strict=True)]

    def _hold(self, model: PreTrainedModel) -> None:
        """Make the engine compute `model`'s weights."""
        if model is self.model:
            return
        # The engine computes in the dtype it was built with: another dtype needs a new one.
        if self.model is not None and self.in_place and model.dtype == self.model.dtype:
            try:
                weights = model.state_dict()
                self.llm.apply_model(lambda m: m.load_weights(iter(weights.items())) and None)
                self.model = model
                return
            # The CPU build's repacked linear layers have no `weight_loader` (AttributeError).
            except (AssertionError, AttributeError, RuntimeError, ValueError) as e:
                log.warning("vLLM cannot load weights in place (%s): rebuilding per version", e)
                self.in_place = False
        self._build(model)
        self.model = model

    def _build(self, model: PreTrainedModel) -> None:
        from toploc.capture_vllm import close_llm, make_llm

        if self.llm is not None:  # the old engine's memory goes first
            close_llm(self.llm)
            self.llm = None
            gc.collect()
        folder = Path(tempfile.mkdtemp(prefix="swarmrl-validate-"))
        try:
            model.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)
            self.llm = make_llm(str(folder), **self._options(model))
        finally:  # the engine holds the weights now; a version's copy on disk is not kept
            shutil.rmtree(folder, ignore_errors=True)

    def _options(self, model: PreTrainedModel) -> dict[str, Any]:
        longest = self.max_model_len or model.config.max_position_embeddings
        return {
            "dtype": str(model.dtype).removeprefix("torch."),
            "max_model_len": longest,
            # Whole requests only (no chunking); room for several short ones per step.
            "max_num_batched_tokens": max(longest, 8192),
            "enable_chunked_prefill": False,
            **self.engine,
        }


def _lm_head(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The version's logits of `hidden` rows, on the CPU in the model's dtype (as hf's)."""
    head = model.get_output_embeddings()
    with torch.no_grad():
        return head(hidden.to(head.weight.device, head.weight.dtype)).to("cpu")
