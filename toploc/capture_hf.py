"""Final-norm capture for Hugging Face causal LMs: during generation, and for the verifier.

Both paths read the input of the LM head (the output of the final norm) through a forward
hook, so they capture exactly the rows that produced the logits:

- `generate`: a padded batch of prompts of different lengths, decoded with a KV cache and
  the seeded sampler; for each completion token the row that produced it. A prompt repeated
  in the batch (a group's G samples) is prefilled once and its cache rows copied.
- `prefill`: rows P-1 .. P+N-2 of prompt + completion[:-1] per rollout with their logits,
  for TOPLOC, the sampling check and the logprob check; each distinct prompt runs once
  (`shared_prompt_logits`, also the trainer's forward, with autograd).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from toploc.sampling import SamplingParams, sample, token_logprobs


@dataclass
class Rollout:
    """One generated completion with what the node submits about it."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    hidden: torch.Tensor | None  # [N, H] final-norm rows in the model's dtype, on CPU
    finish_reason: str  # "stop" (EOS sampled) or "length"
    seed: int
    sample_index: int


@contextmanager
def lm_head_inputs(model: PreTrainedModel) -> Iterator[list[torch.Tensor]]:
    """Collect the LM head's input of every forward pass this thread runs while the context
    is open. Only this thread's: a model is shared between threads (the dashboard's "try the
    policy" generates from the newest version while validation prefills it), and a pass of
    another thread caught here once made `prefill` index past its batch, which then ended
    the coordinator."""
    seen: list[torch.Tensor] = []
    owner = threading.get_ident()

    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if threading.get_ident() == owner:
            seen.append(args[0].detach())

    handle = model.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def contiguous_head_input(model: PreTrainedModel) -> Iterator[None]:
    """Hand the LM head a contiguous input while the context is open. With `logits_to_keep`,
    transformers gives the head a strided slice of the hidden states, and on a CPU a linear
    layer over a strided 3-d input runs as a batched matmul over a copy of its weight,
    expanded once per row: for 4 rows of SmolLM2, 242 ms against 2.8 ms in bf16 and 21.6 ms
    against 8.1 ms in fp32 (thirty-second session; it was a fifth of a bf16 validation)."""

    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (args[0].contiguous(), *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@cache
def _cache_argument(model_class: type) -> str:
    """The forward argument that takes the KV cache: transformers 5.2x renamed
    `past_key_values` to `cache` (the old name warns that it will go), older versions know only
    the old one."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _left_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(seqs), width), dtype=torch.int64)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.int64)
            mask[i, width - len(s) :] = 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    seeds: Sequence[int],
    sample_indices: Sequence[int] | None = None,
    pad_token_id: int = 0,
    capture: bool = True,
    share_prefill: bool = True,
) -> list[Rollout]:
    """Sample one completion per prompt (a padded batch, KV cache, seeded Gumbel-max) and
    capture, for each completion token, the final-norm row that produced it.

    The first forward runs over the distinct prompts only, and its cache, logits and rows
    are then copied to every row that repeats one: a group's G samples share their prompt,
    and its prefill was most of the work (75% on the demo task). Validation does not depend
    on it: the validator recomputes every row with its own full prefill. `share_prefill=False`
    prefills every row (what benchmarks compare against)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if len(seeds) != len(prompts):
        raise ValueError("one seed per prompt")
    b = len(prompts)
    device = model.device
    samples = torch.as_tensor(list(sample_indices or [0] * b), dtype=torch.int64, device=device)
    seed_t = torch.as_tensor(list(seeds), dtype=torch.int64, device=device)
    eos = torch.as_tensor(list(params.eos_token_ids) or [-1], dtype=torch.int64, device=device)

    distinct: dict[tuple[int, ...], int] = {}
    row_of = [
        distinct.setdefault(tuple(p) if share_prefill else (i, *p), len(distinct))
        for i, p in enumerate(prompts)
    ]
    firsts = [prompts[row_of.index(k)] for k in range(len(distinct))]
    ids, mask = _left_pad(firsts, pad_token_id)  # as wide as the whole batch would be
    ids, mask = ids.to(device), mask.to(device)
    pos = _positions(mask)
    copies = torch.as_tensor(row_of, dtype=torch.int64, device=device)
    past = DynamicCache()
    cache_arg = {_cache_argument(type(model)): past}
    tokens: list[torch.Tensor] = []
    logps: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []
    done = torch.zeros(b, dtype=torch.bool, device=device)
    lengths = torch.zeros(b, dtype=torch.int64, device=device)
    step_ids = ids
    with lm_head_inputs(model) if capture else _no_capture() as seen, contiguous_head_input(model):
        for t in range(params.max_tokens):
            out = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=pos,
                **cache_arg,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1, :]
            if t == 0 and len(distinct) < b:  # one row per distinct prompt: copy to its rows
                logits = logits[copies]
                past.batch_select_indices(copies)
                mask, pos = mask[copies], pos[copies]
                if capture:
                    seen[-1] = seen[-1][copies]
            step_pos = torch.full((b,), t, dtype=torch.int64, device=device)
            nxt = sample(logits, params, seed_t, samples, step_pos)
            nxt = torch.where(done, torch.as_tensor(pad_token_id, device=device), nxt)
            tokens.append(nxt)
            logps.append(token_logprobs(logits, nxt, params.temperature))
            if capture:
                rows.append(seen[-1][:, -1, :].to("cpu", copy=True))
                seen.clear()
            lengths += (~done).to(torch.int64)
            done |= torch.isin(nxt, eos)
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
            pos = pos[:, -1:] + 1

    tok = torch.stack(tokens, dim=1).cpu()
    lp = torch.stack(logps, dim=1).float().cpu()
    hid = torch.stack(rows, dim=1) if capture else None
    result = []
    eos_set = set(params.eos_token_ids)
    for i in range(b):
        n = int(lengths[i])
        comp = tok[i, :n].tolist()
        result.append(
            Rollout(
                prompt_ids=list(prompts[i]),
                completion_ids=comp,
                logprobs=lp[i, :n].tolist(),
                hidden=hid[i, :n].contiguous() if hid is not None else None,
                finish_reason="stop" if comp and comp[-1] in eos_set else "length",
                seed=int(seeds[i]),
                sample_index=int(samples[i]),
            )
        )
    return result


@contextmanager
def _no_capture() -> Iterator[list[torch.Tensor]]:
    yield []


@dataclass
class Prefill:
    """The verifier's recomputation for one rollout: rows P-1 .. P+N-2."""

    hidden: torch.Tensor  # [N, H], model dtype
    logits: torch.Tensor  # [N, V], model dtype


@torch.no_grad()
def prefill(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_token_id: int = 0,
    share_prefill: bool = True,
) -> list[Prefill]:
    """The final-norm rows and logits that predicted each completion token, for each
    (prompt, completion) pair: rows P-1 .. P+N-2 of prompt + completion[:-1].

    By default a prompt repeated in the batch (a group's G samples) is run once
    (`shared_prompt_logits`). `share_prefill=False` runs one forward over every whole
    sequence (left-padded), what the shared path is compared against in tests and
    benchmarks."""
    if not share_prefill:
        _check_pairs(prompts, completions)
        return _prefill_whole(model, prompts, completions, pad_token_id)
    with lm_head_inputs(model) as seen:
        logits, copies = shared_prompt_logits(model, prompts, completions, pad_token_id)
    first_hidden = seen[0][:, -1][copies]  # row P-1 of every pair
    hidden = torch.cat([first_hidden[:, None], *seen[1:]], dim=1)
    return [
        Prefill(
            hidden=hidden[i, : len(c)].to("cpu", copy=True),
            # A view: the batch's logits live as long as its checks do anyway, and a copy of
            # each pair's rows cost 0.8 ms a rollout on a CPU (docs/scale.md). On the
            # model's device: the checks run there.
            logits=logits[i, : len(c)],
        )
        for i, c in enumerate(completions)
    ]


def shared_prompt_logits(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_token_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predicted each completion token, `[pairs, longest completion, vocab]`
    (pair i's first len(completions[i]) columns; the rest padding), and which distinct
    prompt each pair has. Autograd flows through it when grad is enabled: the trainer's
    forward is this one.

    Each distinct prompt runs once: a first forward over the distinct prompts (left-padded)
    gives the logits at P-1 and a KV cache, whose rows are copied to every pair that repeats
    the prompt; a second forward runs the completions[:-1] (right-padded) on that cache. The
    LM head sees the prompts' last rows first, then the completions' rows (what `prefill`
    reads through `lm_head_inputs`). A group's G samples share their prompt: on the demo's
    copy task the prompt was about half of each rollout's tokens, on SmolLM2's chat
    template most of them."""
    _check_pairs(prompts, completions)
    device = model.device
    distinct: dict[tuple[int, ...], int] = {}
    row_of = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    copies = torch.as_tensor(row_of, dtype=torch.int64, device=device)
    past = DynamicCache()
    cache_arg = {_cache_argument(type(model)): past}
    with contiguous_head_input(model):
        out, mask = _left_padded_forward(  # the distinct prompts, in order of first appearance
            model, list(distinct), pad_token_id, **cache_arg, use_cache=True, logits_to_keep=1
        )
    first_logits = out.logits[:, -1][copies]
    rest = [list(c)[:-1] for c in completions]
    width = max(len(r) for r in rest)
    if not width:
        return first_logits[:, None], copies
    past.batch_select_indices(copies)
    tail = torch.full((len(rest), width), pad_token_id, dtype=torch.int64)
    tail_mask = torch.zeros((len(rest), width), dtype=torch.int64)
    for i, r in enumerate(rest):
        tail[i, : len(r)] = torch.as_tensor(r, dtype=torch.int64)
        tail_mask[i, : len(r)] = 1
    tail, tail_mask = tail.to(device), tail_mask.to(device)
    lengths = mask.sum(dim=1)[copies]
    positions = lengths[:, None] + torch.arange(width, device=device)[None, :]
    out = model(
        input_ids=tail,
        attention_mask=torch.cat([mask[copies], tail_mask], dim=1),
        position_ids=positions,
        **cache_arg,
        use_cache=True,
    )
    return torch.cat([first_logits[:, None], out.logits], dim=1), copies


def _check_pairs(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> None:
    if len(prompts) != len(completions):
        raise ValueError("one completion per prompt")
    if any(len(p) == 0 for p in prompts) or any(len(c) == 0 for c in completions):
        raise ValueError("prompts and completions need at least one token")


def _prefill_whole(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_token_id: int,
) -> list[Prefill]:
    """`prefill` as one forward pass over prompt + completion[:-1] for each pair (left-padded
    batch)."""
    seqs = [list(p) + list(c)[:-1] for p, c in zip(prompts, completions, strict=True)]
    keep = max(len(c) for c in completions)
    with lm_head_inputs(model) as seen, contiguous_head_input(model):
        out, _ = _left_padded_forward(
            model, seqs, pad_token_id, use_cache=False, logits_to_keep=keep
        )
    hidden = seen[-1][:, -keep:, :]
    logits = out.logits[:, -keep:, :]
    result = []
    for i, c in enumerate(completions):
        n = len(c)
        result.append(
            Prefill(
                hidden=hidden[i, keep - n :].to("cpu", copy=True),
                logits=logits[i, keep - n :].clone(),
            )
        )
    return result


def _left_padded_forward(
    model: PreTrainedModel, seqs: Sequence[Sequence[int]], pad_token_id: int, **kwargs: Any
) -> tuple[Any, torch.Tensor]:
    """One forward pass over `seqs` left-padded into a batch; returns the model's output and
    the attention mask it used."""
    ids, mask = _left_pad(seqs, pad_token_id)
    ids, mask = ids.to(model.device), mask.to(model.device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), **kwargs)
    return out, mask
