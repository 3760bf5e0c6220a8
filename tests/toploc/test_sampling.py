"""Seeded Gumbel-max sampling: the hash, the sampler's distribution, and its replay check."""

import math
import random

import pytest
import torch

from toploc import (
    SamplingCase,
    SamplingParams,
    check_termination,
    sample,
    verify_logprobs,
    verify_sampling,
    verify_sampling_many,
)
from toploc.sampling import M32, allowed_mask, gumbel_at, row_keys, token_logprobs

C1, C2, C3 = 0x7FEB352D, 0x31848BAB, 0x2C1B3C6D


def py_mix(x: int) -> int:
    """The hash with Python's unbounded integers: torch's int64 version must agree exactly
    (so no intermediate overflowed, which is what makes CPU and GPU agree)."""
    x ^= x >> 16
    x = (x * C1) & M32
    x ^= x >> 15
    x = (x * C2) & M32
    x ^= x >> 16
    x = (x * C3) & M32
    return x ^ (x >> 15)


def py_key(seed: int, sample: int, pos: int) -> int:
    k = py_mix((seed & M32) ^ 0x243F6A88)
    k = py_mix(k ^ ((seed >> 32) & M32))
    k = py_mix(k ^ (sample & M32))
    return py_mix(k ^ (pos & M32))


def test_hash_matches_unbounded_integer_arithmetic():
    """The hash runs on int32 with wrapping products; its bits, and the noise's uniform, are
    those of Python's unbounded integers, exactly, for extreme and random inputs."""
    rng = random.Random(5)
    cases = [(0, 0, 0), (2**63 - 1, 7, 31), (123456789, 2**32 - 1, 4095), (2**40 + 5, 3, 0)]
    cases += [(-(2**63), 2**31 - 1, 2**31 - 1), (-1, 0, 1)]
    cases += [(rng.randrange(-(2**63), 2**63), rng.randrange(2**31), rng.randrange(2**20))
              for _ in range(200)]  # fmt: skip
    seeds, samples, pos = (torch.tensor(c, dtype=torch.int64) for c in zip(*cases, strict=True))
    keys = row_keys(seeds, samples, pos)
    assert keys.tolist() == [py_key(s % 2**64, *rest) for s, *rest in cases]
    tokens = [0, 1, 49151, 151935, 2**31 - 1]
    noise_bits = []
    for key in keys.tolist():
        for tok in tokens:
            noise_bits.append(py_mix(key ^ ((tok * 0x9E3779B1 + 0x68E31DA4) & M32)))
    u = torch.tensor([(h + 0.5) / 2**32 for h in noise_bits], dtype=torch.float64)
    got = gumbel_at(keys, torch.tensor([tokens] * len(cases))).reshape(-1)
    assert torch.equal(got, u.log().neg().log().neg())
    assert torch.allclose(got, torch.tensor([-math.log(-math.log(x)) for x in u.tolist()]).double())


def test_noise_depends_on_every_input_and_is_gumbel():
    base = row_keys(torch.tensor([5]), torch.tensor([0]), torch.tensor([0]))
    for other in (
        row_keys(torch.tensor([6]), torch.tensor([0]), torch.tensor([0])),
        row_keys(torch.tensor([5]), torch.tensor([1]), torch.tensor([0])),
        row_keys(torch.tensor([5]), torch.tensor([0]), torch.tensor([1])),
    ):
        assert other.item() != base.item()
    keys = row_keys(torch.full((64,), 9), torch.zeros(64), torch.arange(64))
    g = gumbel_at(keys, torch.arange(4096).expand(64, -1))
    assert abs(g.mean().item() - 0.5772) < 0.01  # Euler-Mascheroni
    assert abs(g.var().item() - math.pi**2 / 6) < 0.03


def test_sampler_frequencies_follow_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    params = SamplingParams(temperature=0.7)
    n = logits.shape[0]
    toks = sample(logits, params, torch.full((n,), 3), torch.arange(n), torch.zeros(n))
    freq = torch.bincount(toks, minlength=4).double() / n
    expected = torch.softmax(logits[0].double() / 0.7, dim=0)
    assert (freq - expected).abs().max() < 0.015


def test_greedy_topk_topp():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 50, generator=g) * 3
    n = logits.shape[0]
    args = (torch.full((n,), 1), torch.zeros(n), torch.arange(n))
    assert torch.equal(sample(logits, SamplingParams(temperature=0), *args), logits.argmax(-1))
    top5 = logits.topk(5, dim=-1).indices
    toks = sample(logits, SamplingParams(top_k=5), *args)
    assert (toks[:, None] == top5).any(dim=1).all()
    mask = allowed_mask(logits, SamplingParams(top_p=0.5))
    probs = torch.softmax(logits.double(), -1)
    kept = (probs * mask).sum(-1)
    assert (kept >= 0.5).all()
    # Removing the least likely kept token would drop below top_p.
    least = probs.masked_fill(~mask, 2.0).min(-1).values
    assert (kept - least < 0.5 + 1e-12).all()
    assert mask.gather(1, sample(logits, SamplingParams(top_p=0.5), *args)[:, None]).all()


def replay_setup(params, seed=42, n=40, vocab=64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * 2
    toks = sample(logits, params, torch.full((n,), seed), torch.full((n,), 3), torch.arange(n))
    return logits, toks


def test_honest_tokens_pass_and_noise_is_tolerated():
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, max_tokens=40)
    logits, toks = replay_setup(params)
    v = verify_sampling(logits, toks, 42, params, sample_index=3)
    assert v.ok and v.violations == 0 and v.termination_ok
    jitter = logits + 1e-5 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    assert verify_sampling(jitter, toks, 42, params, sample_index=3).ok


def test_wrong_seed_sample_or_token_is_caught():
    params = SamplingParams(temperature=1.0, max_tokens=40)
    logits, toks = replay_setup(params)
    assert verify_sampling(logits, toks, 43, params, sample_index=3).violations > 20
    assert verify_sampling(logits, toks, 42, params, sample_index=4).violations > 20
    changed = toks.clone()
    changed[17] = (changed[17] + 1) % 64
    v = verify_sampling(logits, changed, 42, params, sample_index=3)
    assert not v.ok and v.violating_positions == [17]


@pytest.mark.parametrize("top_k, top_p", [(20, 0.9), (0, 1.0), (0, 0.8)])
def test_many_cases_at_once_get_the_verdicts_each_gets_alone(top_k, top_p, monkeypatch):
    params = SamplingParams(temperature=0.9, top_k=top_k, top_p=top_p, max_tokens=40)
    logits, toks = replay_setup(params)
    other_logits, other_toks = replay_setup(params, seed=7)
    changed = toks.clone()
    changed[17] = (changed[17] + 1) % 64
    outside = toks.clone()
    outside[3] = 64
    cases = [
        SamplingCase(logits, toks, 42, 3),  # honest
        SamplingCase(logits, changed, 42, 3),  # one token changed
        SamplingCase(other_logits, other_toks, 7, 3),  # honest, another seed
        SamplingCase(logits, toks, 42, 4),  # the wrong sample index
        SamplingCase(logits[:10], toks[:9], 42, 3),  # a row too many
        SamplingCase(logits, "not ids", 42, 3),  # type: ignore[arg-type]
        SamplingCase(logits, outside, 42, 3),  # a token outside the vocabulary
        SamplingCase(logits.double(), toks, 42, 3),  # another dtype: checked alone
    ]
    many = verify_sampling_many(cases, params)
    alone = [verify_sampling(c.logits, c.tokens, c.seed, params, c.sample_index) for c in cases]
    assert many == alone
    assert [v.ok for v in many] == [True, False, True, False, False, False, False, True]
    assert many[1].violating_positions == [17]
    # The cuts rank rows a block at a time (all rows at once held gigabytes for one large
    # submission): blocks of 3 rows, across the cases' bounds, give the same verdicts.
    from toploc import sampling

    monkeypatch.setitem(sampling.REPLAY_BLOCK, "cpu", 3 * 64)
    assert verify_sampling_many(cases, params) == many


def test_termination():
    p = SamplingParams(max_tokens=5, eos_token_ids=(2,))
    assert check_termination([7, 8, 2], p) == (True, "stop")
    assert check_termination([7, 8, 9, 9, 9], p) == (True, "length")
    assert not check_termination([7, 8, 9], p)[0]  # truncated
    assert not check_termination([7, 2, 9], p)[0]  # continues after EOS
    assert not check_termination([7] * 6, p)[0]
    assert not check_termination([], p)[0]


def test_truncation_and_eos_forgery_are_caught():
    params = SamplingParams(temperature=1.0, max_tokens=40, eos_token_ids=(0,))
    logits, _ = replay_setup(params)
    logits[:, 0] = -1e9  # no natural EOS
    toks = sample(logits, params, torch.full((40,), 42), torch.full((40,), 3), torch.arange(40))
    cut = verify_sampling(logits[:25], toks[:25], 42, params, sample_index=3)
    assert not cut.ok and not cut.termination_ok and cut.violations == 0
    forged = toks[:25].clone()
    forged[-1] = 0
    v = verify_sampling(logits[:25], forged, 42, params, sample_index=3)
    assert not v.ok and v.violating_positions == [24]


def test_bad_token_input_is_a_verdict():
    params = SamplingParams(max_tokens=40)
    logits, toks = replay_setup(params)
    bad = toks.clone()
    bad[0] = 10_000
    assert not verify_sampling(logits, bad, 42, params).ok
    assert not verify_sampling(logits, toks[:-1], 42, params).ok


def test_logprob_check():
    params = SamplingParams(temperature=0.8, max_tokens=40)
    logits, toks = replay_setup(params)
    lp = token_logprobs(logits, toks, 0.8)
    assert verify_logprobs(logits, toks, lp.tolist(), params).ok
    off = lp.clone()
    off[3] += 0.01
    v = verify_logprobs(logits, toks, off, params)
    assert not v.ok and v.bad_positions == [3]
    assert not verify_logprobs(logits, toks, lp[:-1], params).ok
    assert not verify_logprobs(logits, toks, ["x"] * 40, params).ok


@pytest.mark.parametrize("top_p", [1.0, 0.999])
@pytest.mark.parametrize("temperature", [0.8, 1.0])
@pytest.mark.parametrize("spread", [0.5, 5.0, 20.0])
@pytest.mark.parametrize("vocab", [300, 5000])
def test_the_sampler_chooses_exactly_the_argmax_of_every_allowed_score(
    vocab, spread, temperature, top_p
):
    """The node's sampler, whichever way it takes (with no cut: every column of a small
    vocabulary, or noise for the flagged columns and those that can reach their best; with
    top-p: the ranked columns, pruned to those that can win where few can), chooses the argmax
    of every allowed column's score, the first column where scores tie."""
    from toploc.sampling import GUMBEL_SPAN, _scores_at, prune_candidates, ranked_allowed

    torch.manual_seed(int(spread * 10) + vocab)
    logits = torch.randn(64, vocab) * spread
    logits[5, :] = 1.0  # a row of ties in logits
    params = SamplingParams(temperature=temperature, top_p=top_p)
    idx = torch.arange(64)
    got = sample(logits, params, idx * 31 + 5, idx % 8, idx)
    # the unpruned argmax over every allowed column
    cols, keep = ranked_allowed(logits, params)
    full = _scores_at(logits, params, row_keys(idx * 31 + 5, idx % 8, idx), cols)
    full = full.masked_fill(~keep, -math.inf)
    assert torch.equal(got, cols.gather(-1, full.argmax(-1, keepdim=True)).squeeze(-1))
    assert 20 < GUMBEL_SPAN < 30
    if top_p < 1.0 and vocab == 5000:
        rest = idx != 5  # the row of ties cannot be pruned
        pruned, _ = prune_candidates(logits[rest], params, cols[rest], keep[rest])
        assert (pruned.shape[1] < vocab) == (spread > 1.0)  # both of its paths are tested


@pytest.mark.parametrize("spread", [0.5, 20.0])
@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(0.8, 0, 1.0), (1.0, 50, 1.0), (1.0, 0, 0.9), (0.0, 0, 1.0)]
)
def test_replay_scores_only_columns_that_can_win_and_gets_every_rival_exact(
    monkeypatch, spread, temperature, top_k, top_p
):
    """The replay's best competitor, drawn in blocks of rows for the flagged columns and
    those whose logit reaches the floor, equals the brute-force maximum over every competitor
    of every row where it reaches the floor (flat rows: the flagged columns win; peaked ones:
    the top logits), so the verdict and its worst gap are unchanged; below the floor it is
    below the floor and never above the true best."""
    from toploc import sampling

    torch.manual_seed(int(spread * 10) + top_k)
    logits = torch.randn(64, 5000) * spread
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    idx = torch.arange(64)
    keys = row_keys(idx * 31 + 5, idx % 8, idx)
    toks = torch.randint(0, 5000, (64,))
    cols, keep = sampling.ranked_allowed(logits, params)
    competitors = keep & (cols != toks[:, None])
    brute = sampling._scores_at(logits, params, keys, cols).masked_fill(~competitors, -math.inf)
    want = brute.max(dim=1).values
    # A floor below every row's best, then one above the odd rows' (the replay's floor is the
    # token's own score less EXACT_GAP_BELOW).
    above_odd = want - 0.5 + idx % 2
    assert bool((want < above_odd).any())  # some rows' best is below that floor: both cases run
    for floor in (torch.full((64,), -math.inf, dtype=torch.float64), above_odd):
        reach = want >= floor
        ways = [([logits], cols, competitors)]
        if sampling.unrestricted(params, 5000):  # every column, in order: no columns to gather
            pieces = list(logits.split([5, 20, 39]))  # cases' rows
            ways += [(pieces, None, competitors), (pieces, None, None)]
        for rows_a_block in (3, 30):  # pieces split into blocks; pieces joined into one
            monkeypatch.setitem(sampling.REPLAY_BLOCK, "cpu", rows_a_block * 5000)
            for pieces, c, comp in ways:
                got = sampling._best_rival_scores(pieces, params, keys, c, comp, toks, floor)
                assert torch.equal(got[reach], want[reach])
                assert bool((got[~reach] < floor[~reach]).all()) and bool((got <= want).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_a_rival_with_the_most_noise_an_unflagged_column_draws_is_found(dtype, temperature):
    """The cut's edge: in each row one column is given the largest noise any unflagged column
    of the row draws and a score just above the floor; every other column sits far below.
    The replay must find it through its logit alone (it is not flagged)."""
    from toploc import sampling

    rows, width = 16, 49152  # enough columns that some row draws within 0.01 of the edge
    idx = torch.arange(rows)
    keys = row_keys(idx * 7 + 1, idx, idx)
    noise = gumbel_at(keys, torch.arange(width).expand(rows, -1))
    unflagged = noise.masked_fill(noise > sampling.G_UNFLAGGED, -math.inf)
    star = unflagged.argmax(dim=1)
    assert float(unflagged.max()) > sampling.G_UNFLAGGED - 0.01
    logits = torch.full((rows, width), -40.0)
    logits[idx, star] = 0.0
    logits = logits.to(dtype)
    params = SamplingParams(temperature=temperature)
    want = sampling._scores_at(logits, params, keys, star[:, None]).squeeze(1)
    toks = (star + 1) % width
    got = sampling._best_rival_scores([logits], params, keys, None, None, toks, want - 1e-3)
    assert torch.equal(got, want)


def test_rows_where_most_columns_pass_are_scored_whole_and_get_the_same_best(monkeypatch):
    """Where most columns pass the cut (flat rows whose flagged columns all have low logits:
    the floor stays low), the block is scored whole, at what the replay cost before it drew
    noise for few columns; the best is the one the indexed path and the brute force give."""
    from toploc import sampling

    idx = torch.arange(6)
    keys = row_keys(idx + 40, idx, idx)
    every = torch.arange(6000).expand(6, -1)
    logits = torch.zeros(6, 6000)
    logits[gumbel_at(keys, every) > sampling.G_UNFLAGGED] = -100.0
    logits[3] = logits[3] + torch.linspace(0, 0.01, 6000)
    logits = logits.to(torch.bfloat16)
    params = SamplingParams(temperature=1.0)
    toks = torch.randint(0, 6000, (6,))
    brute = sampling._scores_at(logits, params, keys, every)
    brute[idx, toks] = -math.inf
    floor = torch.full((6,), -math.inf, dtype=torch.float64)
    passed = []
    sparse = sampling._sparse_nonzero
    monkeypatch.setattr(sampling, "_sparse_nonzero", lambda m: passed.append(m.sum()) or sparse(m))
    whole = sampling._best_rival_scores([logits], params, keys, None, None, toks, floor)
    assert max(passed) * sampling.DENSE_ABOVE > 6 * 6000  # the whole-block path ran
    monkeypatch.setattr(sampling, "DENSE_ABOVE", 0)  # never whole
    indexed = sampling._best_rival_scores([logits], params, keys, None, None, toks, floor)
    assert torch.equal(whole, brute.max(dim=1).values) and torch.equal(indexed, whole)


@pytest.mark.parametrize("rows, width, density", [(1, 49152, 0.004), (5, 1001, 0.05), (3, 7, 0.5)])
def test_sparse_nonzero_finds_what_nonzero_finds(rows, width, density):
    """The word-at-a-time nonzero gives torch's (rows, columns), in order, whatever the width
    (a tail of fewer than 8 entries included) and however many entries are set."""
    from toploc import sampling

    g = torch.Generator().manual_seed(rows * width)
    for mask in (
        torch.rand(rows, width, generator=g) < density,
        torch.zeros(rows, width, dtype=torch.bool),
        torch.ones(rows, width, dtype=torch.bool),
    ):
        want = torch.nonzero(mask, as_tuple=True)
        got = sampling._sparse_nonzero(mask)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_the_replay_without_a_cut_gives_what_the_ranked_path_gives(monkeypatch):
    """With no top-k or top-p every column is allowed, and the replay skips ranking them; the
    verdicts, violating positions and worst gaps are those of the ranked path (forced here),
    for honest tokens, a changed one, a wrong seed and a flat row where most columns win."""
    from toploc import sampling

    params = SamplingParams(temperature=0.7, max_tokens=40)
    logits, toks = replay_setup(params)
    changed = toks.clone()
    changed[5] = (changed[5] + 3) % 64
    flat_logits = logits * 0.01
    flat_toks = sample(flat_logits, params, torch.full((40,), 9), torch.zeros(40), torch.arange(40))
    cases = [
        SamplingCase(logits, toks, 42, 3),
        SamplingCase(logits, changed, 42, 3),
        SamplingCase(logits, toks, 41, 3),
        SamplingCase(flat_logits, flat_toks, 9, 0),
    ]
    fast = verify_sampling_many(cases, params)
    monkeypatch.setattr(sampling, "unrestricted", lambda params, vocab: False)
    ranked = verify_sampling_many(cases, params)
    assert fast == ranked
    assert [v.ok for v in fast] == [True, False, False, True]


@pytest.mark.gpu
def test_the_hash_and_the_sampler_give_the_same_bits_on_cuda():
    """int32 products wrap on the GPU as on the CPU: the keys and the tokens drawn on CUDA are
    the CPU's, bit for bit, and the noise within float64 logs' last bits (a node on one and a
    validator on the other agree)."""
    if not torch.cuda.is_available():
        pytest.fail("the gpu-marked tests need a CUDA device")
    g = torch.Generator().manual_seed(11)
    seeds = torch.randint(-(2**63), 2**63 - 1, (256,), generator=g, dtype=torch.int64)
    samples, pos = torch.randint(0, 2**31, (256,), generator=g), torch.arange(256)
    keys = row_keys(seeds, samples, pos)
    assert torch.equal(row_keys(seeds.cuda(), samples.cuda(), pos.cuda()).cpu(), keys)
    toks = torch.randint(0, 2**31 - 1, (256, 64), generator=g)
    on_cuda = gumbel_at(keys.cuda(), toks.cuda()).cpu()
    assert torch.allclose(on_cuda, gumbel_at(keys, toks), rtol=0, atol=1e-12)
    logits = torch.randn(256, 49152, generator=g)
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=50)):
        on_cpu = sample(logits, params, seeds, samples, pos)
        on_cuda = sample(logits.cuda(), params, seeds.cuda(), samples.cuda(), pos.cuda())
        assert torch.equal(on_cuda.cpu(), on_cpu)
