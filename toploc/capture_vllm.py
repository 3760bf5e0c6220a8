"""vLLM engine: seeded Gumbel-max sampling as a v1 logits processor, and final-norm capture.

The capture hooks the input of the model's `logits_processor` module: the final-norm rows of
exactly the positions vLLM samples from, one per request, in the same batch order as the
logits our processor sees in the same step. The processor picks each token with the same
seeded sampler as the `hf` engine (`toploc.sampling.sample`), forces it by masking every other
logit, and files the row, token and logprob under the completion position (the length of the
request's output so far). Filing by position makes a discarded step (a partial chunked
prefill) harmless: the next step overwrites it.

Rows travel through module globals, so the engine core and the model must run in this
process: `make_llm` sets VLLM_ENABLE_V1_MULTIPROCESSING=0 and turns async scheduling off (an
asynchronous step could pair one step's rows with another step's tokens).

`prefill_rows` is the validator's side (`toploc.prefill_vllm`): it needs the row of every
position, not only the sampled ones the logits processor sees, so a second hook on the model's
own forward (whose output is the final norm's) files each step's rows with the step's input ids
and positions while a prefill is open.
"""

from __future__ import annotations

import itertools
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from toploc.capture_hf import Rollout
from toploc.sampling import SamplingParams, sample, token_logprobs

EXTRA_KEY = "toploc"


@dataclass
class _Track:
    seed: int
    sample_index: int
    params: SamplingParams
    output: list[int] = field(default_factory=list)  # vLLM's live list of output tokens
    rows: dict[int, torch.Tensor] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    logprobs: dict[int, float] = field(default_factory=dict)


_TRACKS: dict[str, _Track] = {}
_LAST_HIDDEN: list[torch.Tensor | None] = [None]
_PREFILLS: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []
"""Open `prefill_rows` calls: each step's (input ids, positions, final-norm rows), on CPU."""


class CaptureError(RuntimeError):
    """vLLM did not prefill a sequence whole in one step, so its rows cannot be told apart."""


def _hidden_hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
    # LogitsProcessor.forward(lm_head, hidden_states, ...): the rows about to be sampled.
    _LAST_HIDDEN[0] = args[1].detach()


def _forward_hook(
    _module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> None:
    # Model.forward(input_ids, positions, ...) returns the final-norm rows of every token.
    if not _PREFILLS:
        return
    ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
    positions = kwargs["positions"] if "positions" in kwargs else args[1]
    _PREFILLS[-1].append((ids.to("cpu"), positions.to("cpu"), output.detach().to("cpu")))


def _processor_class() -> type:
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

    class SeededGumbelProcessor(LogitsProcessor):
        """Replaces vLLM's sampling for requests that carry `extra_args["toploc"]`."""

        def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
            self.slots: dict[int, _Track] = {}

        def is_argmax_invariant(self) -> bool:
            return False

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if batch_update is None:
                return
            for index in batch_update.removed:
                self.slots.pop(index, None)
            for index, params, _prompt, output in batch_update.added:
                extra = (params.extra_args or {}).get(EXTRA_KEY) if params is not None else None
                track = _TRACKS.get(extra["key"]) if isinstance(extra, dict) else None
                if track is None:
                    self.slots.pop(index, None)
                    continue
                track.output = output
                self.slots[index] = track
            for a, b, direction in batch_update.moved:
                ta, tb = self.slots.pop(a, None), self.slots.pop(b, None)
                if ta is not None:
                    self.slots[b] = ta
                if direction == MoveDirectionality.SWAP and tb is not None:
                    self.slots[a] = tb

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if not self.slots:
                return logits
            hidden = _LAST_HIDDEN[0]
            for index, track in self.slots.items():
                position = len(track.output)
                row = logits[index : index + 1]
                one = torch.ones(1, dtype=torch.int64, device=logits.device)
                token = sample(
                    row, track.params, one * track.seed, one * track.sample_index, one * position
                )
                track.tokens[position] = int(token)
                track.logprobs[position] = float(
                    token_logprobs(row, token, track.params.temperature)
                )
                if hidden is not None:
                    track.rows[position] = hidden[index].to("cpu", copy=True)
                logits[index] = -math.inf
                logits[index, int(token)] = 0.0
            return logits

    return SeededGumbelProcessor


def make_llm(model: str, dtype: str = "float32", **kwargs: Any) -> Any:
    """A vLLM `LLM` in this process with the seeded processor and the capture hook installed."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # vLLM's CPU backend otherwise reserves most of the machine's memory for its KV cache.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    options: dict[str, Any] = {
        "dtype": dtype,
        "enforce_eager": True,
        "async_scheduling": False,
        "enable_prefix_caching": False,
        "seed": 0,
    }
    options.update(kwargs)
    llm = LLM(model=str(model), logits_processors=[_processor_class()], **options)
    llm.apply_model(lambda m: m.logits_processor.register_forward_pre_hook(_hidden_hook) and None)
    llm.apply_model(lambda m: m.register_forward_hook(_forward_hook, with_kwargs=True) and None)
    return llm


def close_llm(llm: Any) -> None:
    """Shut `llm`'s engine down now. vLLM's parallel state is global to the process: an old
    engine left to the garbage collector would tear it down under a newer one whenever it is
    collected (later than expected where anything, e.g. a traceback, still holds it)."""
    llm.llm_engine.engine_core.shutdown()


def prefill_rows(llm: Any, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The final-norm row of every position of each sequence ([len, H] each, CPU, in order):
    one request per sequence with max_tokens=1. The engine must prefill each request whole in
    one step (`make_llm(..., enable_chunked_prefill=False)`): a step's tokens then split into
    requests where the position is 0, and each piece is matched to its sequence by its ids
    (equal sequences have equal rows, so which takes which does not matter)."""
    from vllm import SamplingParams as VllmParams
    from vllm.inputs import TokensPrompt

    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    _PREFILLS.append(steps)
    try:
        llm.generate(
            [TokensPrompt(prompt_token_ids=list(s)) for s in sequences],
            VllmParams(temperature=0.0, max_tokens=1, detokenize=False),
            use_tqdm=False,
        )
    finally:
        _PREFILLS.remove(steps)
    return _match_rows(sequences, steps)


def _match_rows(
    sequences: Sequence[Sequence[int]], steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> list[torch.Tensor]:
    waiting: dict[tuple[int, ...], list[int]] = {}
    for i, seq in enumerate(sequences):
        waiting.setdefault(tuple(seq), []).append(i)
    rows: list[torch.Tensor | None] = [None] * len(sequences)
    for ids, positions, hidden in steps:
        starts = [*(positions == 0).nonzero().flatten().tolist(), len(positions)]
        for a, b in itertools.pairwise(starts):
            owners = waiting.get(tuple(ids[a:b].tolist()))
            if owners:
                rows[owners.pop()] = hidden[a:b]
    missing = [i for i, r in enumerate(rows) if r is None]
    if missing:
        raise CaptureError(
            f"no whole prefill of {len(missing)} of {len(sequences)} sequences (first: "
            f"#{missing[0]}, {len(sequences[missing[0]])} tokens); was chunked prefill on?"
        )
    return [r for r in rows if r is not None]


def generate(
    llm: Any,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    seeds: Sequence[int],
    sample_indices: Sequence[int] | None = None,
) -> list[Rollout]:
    """Like `toploc.capture_hf.generate`, on a vLLM `LLM` built by `make_llm`."""
    from vllm import SamplingParams as VllmParams
    from vllm.inputs import TokensPrompt

    samples = list(sample_indices or [0] * len(prompts))
    keys = [uuid.uuid4().hex for _ in prompts]
    for key, seed, s in zip(keys, seeds, samples, strict=True):
        _TRACKS[key] = _Track(seed=int(seed), sample_index=int(s), params=params)
    try:
        vparams = [
            VllmParams(
                # Greedy over the one-hot logits our processor leaves: vLLM adds no randomness.
                temperature=0.0,
                max_tokens=params.max_tokens,
                ignore_eos=True,
                stop_token_ids=list(params.eos_token_ids),
                extra_args={EXTRA_KEY: {"key": key}},
            )
            for key in keys
        ]
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], vparams, use_tqdm=False
        )
        result = []
        eos = set(params.eos_token_ids)
        for prompt, key, out in zip(prompts, keys, outputs, strict=True):
            track = _TRACKS[key]
            comp = list(out.outputs[0].token_ids)
            chosen = [track.tokens.get(i) for i in range(len(comp))]
            if chosen != comp:
                raise RuntimeError("vLLM emitted tokens the seeded processor did not choose")
            result.append(
                Rollout(
                    prompt_ids=list(prompt),
                    completion_ids=comp,
                    logprobs=[track.logprobs[i] for i in range(len(comp))],
                    hidden=torch.stack([track.rows[i] for i in range(len(comp))]),
                    finish_reason="stop" if comp and comp[-1] in eos else "length",
                    seed=track.seed,
                    sample_index=track.sample_index,
                )
            )
        return result
    finally:
        for key in keys:
            _TRACKS.pop(key, None)
