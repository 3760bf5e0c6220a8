"""Seeded Gumbel-max sampling that a validator can replay, and its checks.

token_t = argmax over allowed v of  logits[v] / T + g(seed, sample, t, v)

where g is Gumbel noise from a counter-based 32-bit integer hash of (seed, sample index,
completion position t, token id), computed with int32 tensor ops whose products wrap modulo
2^32, so CPU and GPU give the same bits (no device RNG). Temperature, then top-k, then top-p
restrict the allowed set deterministically; T = 0 is greedy (no noise).

The validator recomputes the logits, replays the noise and counts positions where the
submitted token's score is more than `tolerance / T` below the best allowed competitor
(numeric noise between the node's engine and the validator's prefill can flip a near tie,
the tolerance absorbs it); see docs/toploc.md for the calibration.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch

M32 = 0xFFFFFFFF
# Odd multipliers below 2^31: a 32-bit value times one stays below 2^63, so int64 never
# overflows (overflow behaviour could differ between devices).
_C1 = 0x7FEB352D
_C2 = 0x31848BAB
_C3 = 0x2C1B3C6D
_TOKEN_SALT = 0x68E31DA4

# Calibrated tolerances in logit units (docs/toploc.md): the largest honest logit error seen
# between generation and prefill, times a safety margin.
DEFAULT_TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.25, torch.bfloat16: 1.0}
# The same for the probability mass ahead of a token at the top-p cut.
DEFAULT_MASS_TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.03, torch.bfloat16: 0.1}
DEFAULT_LOGPROB_TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.25, torch.bfloat16: 1.0}


@dataclass(frozen=True)
class SamplingParams:
    """What the coordinator fixes for every sample of a task."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    max_tokens: int = 64
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class SamplingVerdict:
    ok: bool
    reason: str
    violations: int
    violating_positions: list[int]
    # largest (best competitor - submitted token) score, in score units: exact from
    # -EXACT_GAP_BELOW up, some value below it where every rival is further below
    worst_gap: float
    termination_ok: bool


@dataclass(frozen=True)
class LogprobVerdict:
    ok: bool
    reason: str
    max_abs_err: float
    bad_positions: list[int]


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The low 32 bits of the integers `x` as int32 (two's complement): the hash's state."""
    x = x.to(torch.int64) & M32
    return (x - ((x >> 31) << 32)).to(torch.int32)


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """The state `x` shifted right by `n` as unsigned 32-bit values (int32's own shift keeps
    the sign)."""
    return (x >> n).bitwise_and_((1 << (32 - n)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    # On int32 the products wrap modulo 2^32, which is the hash's arithmetic (two's complement
    # on every device torch runs on; the tests check it against Python's integers): half the
    # bytes of int64 with a mask after each product, and the hash took most of the replay's
    # integer work. The first step makes a new tensor; the rest work on it in place (a fresh
    # tensor per step cost as much as the step).
    return _last(_middle(_spread(x)))


def _spread(x: torch.Tensor) -> torch.Tensor:
    """The hash's first step, x ^ (x >>> 16). It commutes with xor, so for a grid of
    (row key ^ column salt) each key and each salt take it once (`_grid_before_last`)."""
    return x ^ _shr(x, 16)


def _middle(x: torch.Tensor) -> torch.Tensor:
    """The hash's steps between its first and its last, in place."""
    x.mul_(_C1)
    x.bitwise_xor_(_shr(x, 15))
    x.mul_(_C2)
    x.bitwise_xor_(_shr(x, 16))
    return x.mul_(_C3)


def _last(x: torch.Tensor) -> torch.Tensor:
    """The hash's last step, x ^ (x >>> 15), in place: it leaves the top 15 bits as they are,
    so which columns are flagged (FLAG_BITS) is read before it."""
    return x.bitwise_xor_(_shr(x, 15))


def _grid_before_last(spread_keys: torch.Tensor, spread_salts: torch.Tensor) -> torch.Tensor:
    """The hash of every (row, column) of a block but its last step, int32 [n, w], from the
    rows' keys and the columns' salts after `_spread` ([n] and [w] or [n, w])."""
    return _middle(spread_keys[:, None] ^ spread_salts)


def row_keys(seeds: torch.Tensor, samples: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per row from (seed: 64-bit, sample index, position), int64 [B]."""
    seeds = seeds.to(torch.int64)
    key = _mix(_bits(seeds ^ 0x243F6A88))
    key = _mix(key ^ _bits(seeds >> 32))
    key = _mix(key ^ _bits(samples))
    return _mix(key ^ _bits(positions)).to(torch.int64) & M32


def token_salts(tokens: torch.Tensor) -> torch.Tensor:
    """The row-independent half of the noise's hash input for token ids `tokens` (any shape,
    as the hash's int32 state)."""
    return _bits(tokens.to(torch.int64) * 0x9E3779B1 + _TOKEN_SALT)


@lru_cache(maxsize=4)
def _vocab_salts(vocab: int, device: torch.device) -> torch.Tensor:
    """Every column's salt after the hash's first step (`_spread`), int32 [vocab]: the same
    for every row, so the sampler takes it once, not once a decoding step. Never written to."""
    return _spread(token_salts(torch.arange(vocab, device=device)))


def gumbel_at(keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise in float64 for the token ids `tokens` [B, M] of each row's key [B]:
    a pure function of (key, token id), so any subset of the vocabulary can be evaluated."""
    return _noise(_mix(_bits(keys)[:, None] ^ token_salts(tokens)))


def _noise(h: torch.Tensor) -> torch.Tensor:
    """Gumbel noise in float64 from the hash's int32 bits `h` (overwritten)."""
    # u = (h + 0.5) / 2^32 for h read unsigned, in (0, 1), never 0 or 1. Flipping the sign bit
    # makes the int32 read h - 2^31; each step is exact in float64 (33 significant bits).
    u = h.bitwise_xor_(-(2**31)).to(torch.float64)
    u.mul_(1.0 / 4294967296.0).add_(0.5 + 0.5 / 4294967296.0)
    return u.log_().neg_().log_().neg_()


def unrestricted(params: SamplingParams, vocab: int) -> bool:
    """Whether every token of a `vocab`-sized vocabulary is allowed (no top-k or top-p cut)."""
    return not 0 < params.top_k < vocab and params.top_p >= 1.0


def ranked_allowed(
    logits: torch.Tensor, params: SamplingParams, slack: float = 0.0, mass_slack: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens allowed by top-k then top-p, as (columns [B, W] in descending logit order, keep
    [B, W] bool). Positive slacks widen the set (tokens within `slack` of the top-k cut in
    scaled logits, or `mass_slack` of the top-p cut in probability mass), negative ones narrow
    it. Both cuts are by rank, so only the W best-ranked columns are ever touched."""
    t = params.temperature if params.temperature > 0 else 1.0
    rows, vocab = logits.shape
    if unrestricted(params, vocab):
        cols = torch.arange(vocab, device=logits.device).expand(rows, -1)
        return cols, torch.ones((rows, vocab), dtype=torch.bool, device=logits.device)
    flat = logits.float()
    if 0 < params.top_k < vocab:
        kth = flat.topk(params.top_k, dim=-1).values[:, -1:].double() / t
        # Ties and the slack can admit more than k tokens: count them on the whole row.
        bound = ((kth - slack) * t).float()
        width = int((flat >= bound).sum(dim=-1).max())
        width = max(1, min(vocab, width))
        vals, cols = flat.topk(width, dim=-1, sorted=True)
        scaled = vals.double() / t
        keep = scaled >= kth - slack
    else:
        vals, cols = flat.sort(dim=-1, descending=True, stable=True)
        scaled = vals.double() / t
        keep = torch.ones_like(scaled, dtype=torch.bool)
    if params.top_p < 1.0:
        probs = torch.softmax(scaled.masked_fill(~keep, -math.inf), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly ahead in the order
        keep &= before < params.top_p + mass_slack
    return cols, keep


def allowed_mask(
    logits: torch.Tensor, params: SamplingParams, slack: float = 0.0, mass_slack: float = 0.0
) -> torch.Tensor:
    """`ranked_allowed` as a [B, V] bool mask."""
    cols, keep = ranked_allowed(logits, params, slack, mass_slack)
    return torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter(1, cols, keep)


def _scores_at(
    logits: torch.Tensor, params: SamplingParams, keys: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """logits / T + Gumbel noise at the columns `cols` (plain logits when T = 0), float64."""
    return _scores_of(logits.gather(-1, cols), params, keys, cols)


def _scores_of(
    picked: torch.Tensor, params: SamplingParams, keys: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """`_scores_at` from the logits already taken at `cols`."""
    picked = picked.to(torch.float64)
    if params.temperature <= 0:
        return picked
    return picked / params.temperature + gumbel_at(keys, cols)


def _gumbel(u: float) -> float:
    return -math.log(-math.log(u))


# The noise is bounded: u lies in [0.5, 2^32 - 0.5] / 2^32, so g lies in [G_MIN, G_MAX]. A token
# whose scaled logit is more than G_MAX - G_MIN below the row's best can never win the argmax.
GUMBEL_SPAN = _gumbel((2**32 - 0.5) / 2**32) - _gumbel(0.5 / 2**32) + 1e-6


def can_win(scaled: torch.Tensor, top: torch.Tensor | None = None) -> torch.Tensor:
    """The columns of `scaled` ([B, W] scaled logits, -inf where not allowed) that the bounded
    noise can still lift to their row's top: those within GUMBEL_SPAN of the row's best
    (`top`, [B, 1], where the caller has it)."""
    if top is None:
        top = scaled.max(dim=-1, keepdim=True).values
    return scaled >= top - GUMBEL_SPAN


# Rows this narrow are scored whole: finding the columns that cannot win costs more than it saves.
PRUNE_MIN_WIDTH = 256
# Rows this narrow get every column's noise in the sampler without a cut (`_sampled_argmax`)
# and in the replay: for 8 rows the sampler's way for few columns took 353 us against 234
# whole at 100 columns, about as long at 4,096, half at 16,384, a third at 49,152.
WHOLE_UP_TO = 4096


def prune_candidates(
    logits: torch.Tensor, params: SamplingParams, cols: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that cannot win the Gumbel argmax (exact). The bound is loose (the
    noise's tail reaches +22.9), so this pays off for peaked distributions (low temperature,
    RL-trained policies): it is applied only when it removes at least 3/4 of the columns."""
    if params.temperature <= 0 or cols.shape[1] <= PRUNE_MIN_WIDTH:
        return cols, keep
    scaled = (logits.gather(-1, cols).double() / params.temperature).masked_fill(~keep, -math.inf)
    candidates = can_win(scaled)
    width = int(candidates.sum(dim=-1).max())
    if width * 4 > cols.shape[1]:
        return cols, keep
    idx = scaled.topk(width, dim=-1).indices
    return cols.gather(-1, idx), candidates.gather(-1, idx)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    seeds: torch.Tensor,
    samples: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """The seeded sampler: next token ids [B] for logits [B, V]; per-row seed, sample index and
    completion position (int64 [B])."""
    keys = row_keys(seeds, samples, positions)
    if params.temperature > 0 and unrestricted(params, logits.shape[1]):
        # Every column allowed (a sampled LLM's rows, no cut): the argmax of every column's
        # score, with the noise drawn only where it can win, as the replay draws it.
        step = block_rows(logits.device, logits.shape[1])
        return torch.cat(
            [
                _sampled_argmax(logits[a : a + step], params.temperature, keys[a : a + step])
                for a in range(0, logits.shape[0], step)
            ]
        )
    cols, keep = prune_candidates(logits, params, *ranked_allowed(logits, params))
    s = _scores_at(logits, params, keys, cols)
    s = s.masked_fill(~keep, -math.inf)
    return cols.gather(-1, s.argmax(dim=-1, keepdim=True)).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) at the chosen tokens (T = 0 counts as 1), float32 [N]: the
    behaviour logprobs a node reports and the validator recomputes. Masks do not apply, so the
    trainer's importance ratios see the full distribution. Computed a block of rows at a time
    (`block_rows`): the same values, and on a CPU 3.5x faster than all rows at once, whose
    float32 copies outgrew the caches."""
    tokens = tokens.view(-1, 1).to(logits.device, torch.int64)
    out = torch.empty(tokens.shape[0], dtype=torch.float32, device=logits.device)
    step = block_rows(logits.device, logits.shape[-1])
    for a in range(0, tokens.shape[0], step):
        scaled = logits[a : a + step].float()
        if temperature > 0 and temperature != 1.0:  # x / 1.0 is x: skip a pass over the vocabulary
            scaled = scaled / temperature
        out[a : a + step] = torch.log_softmax(scaled, dim=-1).gather(-1, tokens[a : a + step])[:, 0]
    return out


def check_termination(tokens: Sequence[int], params: SamplingParams) -> tuple[bool, str]:
    """A completion ends at its first EOS (which the sampling check confirms was sampled) or
    exactly at the length cap; anything else was cut short or ran on."""
    n = len(tokens)
    eos = set(params.eos_token_ids)
    if n == 0:
        return False, "empty completion"
    if n > params.max_tokens:
        return False, f"{n} tokens exceed max_tokens {params.max_tokens}"
    early = [i for i, t in enumerate(tokens[:-1]) if t in eos]
    if early:
        return False, f"tokens continue after EOS at position {early[0]}"
    if tokens[-1] in eos:
        return True, "stop"
    if n == params.max_tokens:
        return True, "length"
    return False, f"truncated: {n} < max_tokens {params.max_tokens} without EOS"


@dataclass(frozen=True)
class SamplingCase:
    """One rollout (or one model turn of it) for `verify_sampling_many`."""

    logits: torch.Tensor
    """The validator's logits [N, V] (rows P-1 .. P+N-2)."""
    tokens: Sequence[int] | torch.Tensor
    seed: int
    sample_index: int = 0


def verify_sampling(
    logits: torch.Tensor,
    tokens: Sequence[int] | torch.Tensor,
    seed: int,
    params: SamplingParams,
    sample_index: int = 0,
    tolerance: float | None = None,
    max_violations: int = 0,
    mass_tolerance: float | None = None,
) -> SamplingVerdict:
    """Replay the seeded sampler on the validator's logits [N, V] (rows P-1 .. P+N-2) and
    check each submitted token, plus the termination rule.

    A position violates when the token is outside the (tolerance-widened) top-k/top-p set, or
    its score is more than tolerance / T below the best competitor that is surely allowed.
    `tolerance` is in logit units, `mass_tolerance` in probability mass at the top-p cut;
    both default by the logits' dtype (DEFAULT_TOLERANCE, DEFAULT_MASS_TOLERANCE).
    """
    case = SamplingCase(logits, tokens, seed, sample_index)
    return verify_sampling_many([case], params, tolerance, max_violations, mass_tolerance)[0]


def verify_sampling_many(
    cases: Sequence[SamplingCase],
    params: SamplingParams,
    tolerance: float | None = None,
    max_violations: int = 0,
    mass_tolerance: float | None = None,
) -> list[SamplingVerdict]:
    """`verify_sampling` of each case, with the rows of every well-formed case in one pass of
    tensor ops (a validator checks a submission's rollouts together: one by one, the per-call
    overhead cost as much as the work on a small model). Every cut and score is per row, so
    each verdict is the one the case gets alone; cases are taken together by the dtype and
    device of their logits."""
    out: list[SamplingVerdict | None] = [None] * len(cases)
    ready: list[tuple[int, torch.Tensor, bool, str]] = []
    for i, case in enumerate(cases):
        logits = case.logits
        n, vocab = logits.shape
        try:
            toks = torch.as_tensor(case.tokens, dtype=torch.int64, device=logits.device).view(-1)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            out[i] = SamplingVerdict(False, "tokens are not a list of ids", n, [], math.inf, False)
            continue
        term_ok, term_reason = check_termination(toks.tolist(), params)
        if toks.numel() != n:
            why = f"{toks.numel()} tokens for {n} rows"
            out[i] = SamplingVerdict(False, why, n, [], math.inf, False)
        elif n and (toks.min() < 0 or toks.max() >= vocab):
            out[i] = SamplingVerdict(
                False, "token id outside the vocabulary", n, [], math.inf, False
            )
        else:
            ready.append((i, toks, term_ok, term_reason))
    kinds: dict[tuple[torch.dtype, torch.device], list[tuple[int, torch.Tensor, bool, str]]] = {}
    for r in ready:
        logits = cases[r[0]].logits
        kinds.setdefault((logits.dtype, logits.device), []).append(r)
    for part in kinds.values():
        for i, verdict in _replay(cases, part, params, tolerance, max_violations, mass_tolerance):
            out[i] = verdict
    verdicts = [v for v in out if v is not None]
    if len(verdicts) != len(cases):
        raise RuntimeError("a sampling case was left without a verdict")  # a bug, not input
    return verdicts


# Entries per block of the replay's and token_logprobs' [rows, columns] work, by device type,
# so their temporaries stay small whatever the batch (all rows at once thrashed a CPU's caches
# and page tables, and held gigabytes for a large batch on a 150k vocabulary). On a CPU a
# block about fits the L2 cache (docs/scale.md); on a GPU, fewer and larger launches (each
# replay block waits for its `nonzero`s).
REPLAY_BLOCK = {"cpu": 1 << 20}
REPLAY_BLOCK_ELSEWHERE = 1 << 22


def block_rows(device: torch.device, width: int) -> int:
    """Rows of `width` columns per block of work on `device` (REPLAY_BLOCK)."""
    return max(1, REPLAY_BLOCK.get(device.type, REPLAY_BLOCK_ELSEWHERE) // max(1, width))


# A column's noise is evaluated only where it can matter. The hash's top FLAG_BITS bits are
# all set for one column in 2^FLAG_BITS (u > 1 - 2^-FLAG_BITS); any other column's noise is
# at most G_UNFLAGGED, so it cannot score above its scaled logit + G_UNFLAGGED. The hash is
# integer work; the float64 logs it skips were half the replay (docs/scale.md).
FLAG_BITS = 8
G_UNFLAGGED = -math.log(-math.log1p(-(2.0**-FLAG_BITS))) + 1e-9  # + torch's last-bit rounding
# How far below the token's own score a rival's score is still exact in the worst gap.
EXACT_GAP_BELOW = 1.0
# Where more than 1 / DENSE_ABOVE of a block's columns pass, they are scored whole: indexing
# costs ~30 ns an entry, the whole row's noise ~7.
DENSE_ABOVE = 4


def _best_rival_scores(
    pieces: Sequence[torch.Tensor],
    params: SamplingParams,
    keys: torch.Tensor,
    cols: torch.Tensor | None,
    competitors: torch.Tensor | None,
    excluded: torch.Tensor,
    floor: torch.Tensor,
) -> torch.Tensor:
    """Each row's best score among its `competitors` (columns `cols`, or every column in
    order for None), float64 [rows], where the rows are those of the logits `pieces` one
    after another (each case's own tensor: concatenating them first copied every logit once
    more): exact where it is `floor` (float64 [rows]) or more, and some score below `floor`
    (-inf where there is none) otherwise. `excluded` holds each row's own token (int64
    [rows]); with `competitors` None every other column competes, and no mask the size of
    the logits is made.

    The noise is drawn for few columns: first for the flagged ones (their hash's top bits
    set), whose best is a rival's score and so raises the floor; then for the unflagged ones
    whose scaled logit + G_UNFLAGGED reaches it. The rest score below the floor whatever
    their noise. An honest row's floor is near its token's score, which is near the top of
    the row: a few hundred columns of SmolLM2's 49,152 at T = 1, a handful for a peaked
    distribution; a forged token's low score is lifted by the flagged columns' best."""
    rows = excluded.shape[0]
    width = pieces[0].shape[1] if cols is None else cols.shape[1]
    device = excluded.device
    best = torch.full((rows,), -math.inf, dtype=torch.float64, device=device)
    step = block_rows(device, width)
    spread_keys = _spread(_bits(keys))
    for a, b, lb in _row_blocks(pieces, step):
        if cols is not None:
            lb = lb.gather(-1, cols[a:b])
        comp = None if competitors is None else competitors[a:b]
        if params.temperature <= 0:  # greedy draws no noise
            best[a:b] = _row_best(lb.to(torch.float64, copy=True), comp, excluded[a:b])
            continue
        salts = _vocab_salts(width, device) if cols is None else _spread(token_salts(cols[a:b]))
        pre = _grid_before_last(spread_keys[a:b], salts)
        if width <= WHOLE_UP_TO:  # a narrow row gets every column's noise
            scores = _every_score(lb, pre, params.temperature)
            best[a:b] = _row_best(scores, comp, excluded[a:b])
            continue
        flagged = (pre >> (32 - FLAG_BITS)).eq_(-1).bool()  # in place, then cast: 3x faster
        _leave_out(flagged, comp, excluded[a:b], False)
        _raise_to_scores(best[a:b], flagged, lb, pre, params.temperature)
        cut = _logit_cut(torch.maximum(floor[a:b], best[a:b]) - G_UNFLAGGED, params.temperature)
        near = lb.float() >= cut[:, None]  # flagged ones again too: the max is the same
        _leave_out(near, comp, excluded[a:b], False)
        _raise_to_scores(best[a:b], near, lb, pre, params.temperature)
    return best


def _row_blocks(
    pieces: Sequence[torch.Tensor], step: int
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(a, b, rows a..b) of the pieces taken one after another, at most `step` rows at a time.
    A piece longer than a block is split into views; whole pieces that fit in one block
    together are joined (a copy, of a narrow vocabulary's rows: a block per piece cost more
    in per-call overhead than the copy)."""
    start, group, rows = 0, [], 0  # whole pieces waiting to be joined into the next block
    for piece in pieces:
        n = piece.shape[0]
        if group and rows + n > step:
            yield start, start + rows, group[0] if len(group) == 1 else torch.cat(group)
            start, group, rows = start + rows, [], 0
        if n > step:
            for a in range(0, n, step):
                yield start + a, start + min(n, a + step), piece[a : a + step]
            start += n
        else:
            group.append(piece)
            rows += n
    if group:
        yield start, start + rows, group[0] if len(group) == 1 else torch.cat(group)


def _raise_to_scores(
    best: torch.Tensor, mask: torch.Tensor, lb: torch.Tensor, pre: torch.Tensor, temperature: float
) -> None:
    """Raise `best` [n] (in place) to each row's best score over the columns in `mask`
    [n, w], from the block's logits `lb` and hash before its last step `pre`: the values
    `_scores_at` gives."""
    r, k = _sparse_nonzero(mask)
    if r.numel() * DENSE_ABOVE > mask.numel():
        # Rows flat enough that most columns pass (no LM's, but logits are what a node's
        # completion makes them): scored whole, as cheap as the replay has ever been.
        s = _every_score(lb, pre.clone(), temperature).masked_fill_(~mask, -math.inf)
        best.copy_(torch.maximum(best, s.max(dim=1).values))
        return
    best.scatter_reduce_(0, r, _scores_from_bits(lb, pre, r, k, temperature), "amax")


def _sampled_argmax(logits: torch.Tensor, temperature: float, keys: torch.Tensor) -> torch.Tensor:
    """The first column of each row [B] with the highest score (logits / T + noise) over the
    whole row, which is torch.argmax's choice, with the noise drawn as the replay draws it:
    the flagged columns' best score is a lower bound on the row's top, and any other column
    that can reach it has a scaled logit within G_UNFLAGGED of it."""
    rows, vocab = logits.shape
    pre = _grid_before_last(_spread(_bits(keys)), _vocab_salts(vocab, logits.device))
    if vocab <= WHOLE_UP_TO:
        return _every_score(logits, pre, temperature).argmax(dim=1)
    flagged = (pre >> (32 - FLAG_BITS)).eq_(-1).bool()
    top = torch.full((rows,), -math.inf, dtype=torch.float64, device=logits.device)
    _raise_to_scores(top, flagged, logits, pre, temperature)
    drawn = (logits.float() >= _logit_cut(top - G_UNFLAGGED, temperature)[:, None]) | flagged
    r, k = _sparse_nonzero(drawn)
    if r.numel() * DENSE_ABOVE > drawn.numel():  # flat rows (or no column flagged)
        return _every_score(logits, pre, temperature).argmax(dim=1)
    s = _scores_from_bits(logits, pre, r, k, temperature)
    top.scatter_reduce_(0, r, s, "amax")
    at_top = s == top[r]  # every column with the top score was drawn: the others score less
    first = torch.full((rows,), vocab, dtype=torch.int64, device=logits.device)
    return first.scatter_reduce_(0, r[at_top], k[at_top], "amin")


def _scores_from_bits(
    lb: torch.Tensor, pre: torch.Tensor, r: torch.Tensor, k: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The scores at entries (r, k) of a block from its logits `lb` and hash before its last
    step `pre`."""
    s = lb[r, k].to(torch.float64)
    if temperature != 1.0:  # x / 1.0 is x: skip it
        s.div_(temperature)
    return s.add_(_noise(_last(pre[r, k])))


def _every_score(lb: torch.Tensor, pre: torch.Tensor, temperature: float) -> torch.Tensor:
    """The score of every entry of a block, float64 (`pre` is overwritten: a caller that
    reads it after hands a copy)."""
    s = lb.to(torch.float64, copy=True)
    if temperature != 1.0:
        s.div_(temperature)
    return s.add_(_noise(_last(pre)))


def _sparse_nonzero(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (rows, columns) of the True entries of a sparse, contiguous bool matrix [n, w],
    in order: the 8-byte words with any set first, then their bytes (torch's `nonzero` reads
    a byte at a time: 32 us a row of 49,152 here, against 16 by words)."""
    w = mask.shape[1]
    flat = mask.view(-1)
    whole = flat.numel() // 8 * 8
    hit = torch.nonzero(flat[:whole].view(torch.int64)).squeeze(1)
    byte = torch.nonzero(flat[:whole].view(-1, 8)[hit])
    idx = hit[byte[:, 0]] * 8 + byte[:, 1]
    if whole < flat.numel():
        idx = torch.cat([idx, torch.nonzero(flat[whole:]).squeeze(1) + whole])
    return idx // w, idx % w


def _logit_cut(scaled: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 thresholds that every logit whose scaled value (logit / T, in float64) reaches
    `scaled` also reaches in float32: set lower by float64's and float32's rounding."""
    cut = scaled * temperature
    return (cut - (cut.abs() + 1.0) * (2 * torch.finfo(torch.float32).eps)).float()


def _row_best(
    scores: torch.Tensor, competitors: torch.Tensor | None, excluded: torch.Tensor
) -> torch.Tensor:
    """Each row's best of the block's `scores` [n, w] (float64, overwritten) among the
    columns that compete (`_leave_out`)."""
    _leave_out(scores, competitors, excluded, -math.inf)
    return scores.max(dim=1).values


def _leave_out(
    x: torch.Tensor, competitors: torch.Tensor | None, excluded: torch.Tensor, value: float
) -> None:
    """Set `value` in place where a column of the block `x` [n, w] does not compete: outside
    `competitors`, or, for None, at each row's own token `excluded` [n]."""
    if competitors is None:
        x[torch.arange(x.shape[0], device=x.device), excluded] = value
    else:
        x.masked_fill_(~competitors, value)


def _replay(
    cases: Sequence[SamplingCase],
    part: list[tuple[int, torch.Tensor, bool, str]],
    params: SamplingParams,
    tolerance: float | None,
    max_violations: int,
    mass_tolerance: float | None,
) -> list[tuple[int, SamplingVerdict]]:
    """The seeded sampler's replay over the rows of the well-formed cases in `part` (case
    index, tokens, termination), which share a dtype and device."""
    pieces = [cases[i].logits for i, *_ in part]
    toks = torch.cat([t for _, t, *_ in part])
    device, dtype, vocab = pieces[0].device, pieces[0].dtype, pieces[0].shape[1]
    sizes = [p.shape[0] for p in pieces]
    tol = DEFAULT_TOLERANCE.get(dtype, 1e-3) if tolerance is None else tolerance
    mass = DEFAULT_MASS_TOLERANCE.get(dtype, 1e-3) if mass_tolerance is None else mass_tolerance
    t = params.temperature if params.temperature > 0 else 1.0
    score_tol = tol / t

    counts = torch.as_tensor(sizes)
    keys = row_keys(
        torch.as_tensor([cases[i].seed for i, *_ in part], dtype=torch.int64)
        .repeat_interleave(counts)
        .to(device),
        torch.as_tensor([cases[i].sample_index for i, *_ in part], dtype=torch.int64)
        .repeat_interleave(counts)
        .to(device),
        torch.cat([torch.arange(n) for n in sizes]).to(device),
    )
    taken = zip(pieces, toks.split(sizes), strict=True)
    picked = torch.cat([p.gather(1, tk[:, None]) for p, tk in taken])
    own = _scores_of(picked, params, keys, toks[:, None]).squeeze(1)
    floor = own - EXACT_GAP_BELOW  # a rival further below cannot fail the token
    if unrestricted(params, vocab):
        # Every column is allowed (the tokens were checked to be in the vocabulary): no cut
        # to compare with, and the competitors are every column but the token's own.
        eligible = torch.ones(toks.shape, dtype=torch.bool, device=device)
        best = _best_rival_scores(pieces, params, keys, None, None, toks, floor)
    else:
        eligible, best = _restricted_rivals(pieces, params, keys, toks, floor, score_tol, mass)
    gap = best - own
    bad = (~eligible) | (gap > score_tol)
    verdicts = []
    for (i, _, term_ok, term_reason), case_bad, case_gap in zip(
        part, bad.split(sizes), gap.split(sizes), strict=True
    ):
        bad_pos = torch.nonzero(case_bad).view(-1).tolist()
        finite = case_gap[torch.isfinite(case_gap)]
        worst = float(finite.max()) if finite.numel() else -math.inf
        reasons = []
        if len(bad_pos) > max_violations:
            reasons.append(
                f"{len(bad_pos)} positions not chosen by the seeded sampler (first {bad_pos[:5]})"
            )
        if not term_ok:
            reasons.append(term_reason)
        verdict = SamplingVerdict(
            ok=not reasons,
            reason="; ".join(reasons) if reasons else f"ok ({term_reason})",
            violations=len(bad_pos),
            violating_positions=bad_pos[:32],
            worst_gap=worst,
            termination_ok=term_ok,
        )
        verdicts.append((i, verdict))
    return verdicts


def _restricted_rivals(
    pieces: Sequence[torch.Tensor],
    params: SamplingParams,
    keys: torch.Tensor,
    toks: torch.Tensor,
    floor: torch.Tensor,
    score_tol: float,
    mass: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(whether each row's token is inside the relaxed top-k / top-p cut, its best rival's
    score inside the narrowed one), block by block of rows: a cut ranks whole rows, and its
    temporaries take about 63 bytes an entry for top-p, so ranking a submission's rows at
    once held gigabytes for one junk submission (1,024 rows of a 49,152 vocabulary: 3 GB)."""
    eligible, best = [], []
    step = block_rows(toks.device, pieces[0].shape[1])
    for a, b, lb in _row_blocks(pieces, step):
        tb = toks[a:b, None]
        relaxed_cols, relaxed_keep = ranked_allowed(lb, params, score_tol, mass)
        eligible.append(((relaxed_cols == tb) & relaxed_keep).any(dim=1))
        del relaxed_cols, relaxed_keep
        cols, keep = ranked_allowed(lb, params, -score_tol, -mass)
        competitors = keep & (cols != tb)  # the token itself excluded
        best.append(
            _best_rival_scores([lb], params, keys[a:b], cols, competitors, toks[a:b], floor[a:b])
        )
    return torch.cat(eligible), torch.cat(best)


def verify_logprobs(
    logits: torch.Tensor,
    tokens: Sequence[int] | torch.Tensor,
    logprobs: Sequence[float] | torch.Tensor,
    params: SamplingParams,
    tolerance: float | None = None,
    recomputed: torch.Tensor | None = None,
) -> LogprobVerdict:
    """Reported behaviour logprobs must match the recomputed ones within `tolerance` (absolute,
    default by dtype) at every position. `recomputed`: `token_logprobs` of these logits and
    tokens, where the caller has them already (a validator keeps them for the trainer), which
    spares a second softmax over the vocabulary."""
    try:
        toks = torch.as_tensor(tokens, dtype=torch.int64, device=logits.device).view(-1)
        reported = torch.as_tensor(logprobs, dtype=torch.float32, device=logits.device).view(-1)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return LogprobVerdict(False, "tokens or logprobs are not lists of numbers", math.inf, [])
    if reported.numel() != toks.numel() or toks.numel() != logits.shape[0]:
        return LogprobVerdict(False, "logprob count differs from token count", math.inf, [])
    tol = DEFAULT_LOGPROB_TOLERANCE.get(logits.dtype, 1e-3) if tolerance is None else tolerance
    if recomputed is None:
        recomputed = token_logprobs(logits, toks, params.temperature)
    err = (recomputed - reported).abs()
    err = torch.nan_to_num(err, nan=math.inf)
    bad = torch.nonzero(err > tol).view(-1).tolist()
    worst = float(err.max()) if err.numel() else 0.0
    if bad:
        return LogprobVerdict(False, f"{len(bad)} logprobs off by up to {worst:.3g}", worst, bad)
    return LogprobVerdict(True, "ok", worst, [])
