"""Detection table: honest and cheating rollouts through the full validation checks.

For each model, generate honest rollouts (several batch sizes, mixed prompt lengths, fp32) and
cheating ones, then validate every submission the way the coordinator does: one fp32 prefill
of its own copy of the prompt + the submitted completion, then the TOPLOC proofs, the seeded
sampling replay, the termination rule and the logprob comparison. Prints how many rollouts of
each case were flagged and by which check; writes bench/results/toploc_detection.json.

    python bench/toploc_detection.py [--quick] [--models tiny,smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Other bench scripts are named like packages (bench/protocol.py would shadow `protocol`):
# import from the repository root, not from this script's folder.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from toploc import (  # noqa: E402
    SamplingParams,
    build_proofs,
    token_logprobs,
    verify_logprobs,
    verify_proofs,
    verify_sampling,
)
from toploc.capture_hf import Rollout, generate, prefill  # noqa: E402
from toploc.models import eos_token_ids, load_model  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "toploc_detection.json"
CHECKS = ("toploc", "sampling", "termination", "logprob")


@dataclass
class Submission:
    prompt_ids: list[int]  # the coordinator's copy from the lease, never the node's
    completion_ids: list[int]
    logprobs: list[float]
    proofs: list[bytes]
    seed: int
    sample_index: int


def make_prompts(tok, name: str, count: int, rng: random.Random) -> list[list[int]]:
    """Prompts of mixed lengths (so batches are padded)."""
    prompts = []
    for _ in range(count):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        filler = " ".join(
            rng.choice(["please", "now", "carefully", "quickly", "step by step"])
            for _ in range(rng.randint(0, 6))
        )
        question = f"What is {a} + {b}? {filler}".strip()
        if name == "tiny":
            ids = tok(question).input_ids
        else:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
            )
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        prompts.append(list(ids))
    return prompts


def run(model, prompts, params, seeds, samples, batch, pad) -> list[Rollout]:
    out: list[Rollout] = []
    for i in range(0, len(prompts), batch):
        out += generate(
            model,
            prompts[i : i + batch],
            params,
            seeds[i : i + batch],
            samples[i : i + batch],
            pad_token_id=pad,
        )
    return out


def from_rollout(r: Rollout, true_prompt: list[int]) -> Submission:
    return Submission(
        true_prompt, r.completion_ids, r.logprobs, build_proofs(r.hidden), r.seed, r.sample_index
    )


def honestly_prefilled(model, prompt, completion, seed, sample, params, pad) -> Submission:
    """What a cheater submits after one honest prefill of a token string it chose."""
    (pf,) = prefill(model, [prompt], [completion], pad_token_id=pad)
    lp = token_logprobs(pf.logits, torch.tensor(completion), params.temperature)
    return Submission(prompt, list(completion), lp.tolist(), build_proofs(pf.hidden), seed, sample)


def validate(model, subs: list[Submission], params, pad, batch=8) -> list[dict]:
    results = []
    for i in range(0, len(subs), batch):
        group = subs[i : i + batch]
        pfs = prefill(
            model,
            [s.prompt_ids for s in group],
            [s.completion_ids for s in group],
            pad_token_id=pad,
        )
        for s, pf in zip(group, pfs, strict=True):
            proofs = verify_proofs(pf.hidden, s.proofs)
            samp = verify_sampling(pf.logits, s.completion_ids, s.seed, params, s.sample_index)
            lp = verify_logprobs(pf.logits, s.completion_ids, s.logprobs, params)
            results.append(
                {
                    "toploc": not all(v.ok for v in proofs),
                    "sampling": samp.violations > 0,
                    "termination": not samp.termination_ok,
                    "logprob": not lp.ok,
                    "max_exp_mismatches": max(v.exp_mismatches for v in proofs),
                    "max_mant_err_mean": max(v.mant_err_mean for v in proofs),
                    "violations": samp.violations,
                    "worst_gap": samp.worst_gap,
                    "max_logprob_err": lp.max_abs_err,
                }
            )
    return results


def summarise(case: str, kind: str, results: list[dict]) -> dict:
    flagged = [r for r in results if any(r[c] for c in CHECKS)]
    finite = [r["worst_gap"] for r in results if r["worst_gap"] != float("inf")]
    return {
        "case": case,
        "kind": kind,
        "n": len(results),
        "flagged": len(flagged),
        "by_check": {c: sum(r[c] for r in results) for c in CHECKS},
        "only_check": {
            c: sum(r[c] and not any(r[o] for o in CHECKS if o != c) for r in results)
            for c in CHECKS
        },
        "max_exp_mismatches": max(r["max_exp_mismatches"] for r in results),
        "min_exp_mismatches": min(r["max_exp_mismatches"] for r in results),
        "max_mant_err_mean": max(r["max_mant_err_mean"] for r in results),
        "max_violations": max(r["violations"] for r in results),
        "worst_gap": max(finite) if finite else None,
        "max_logprob_err": max(r["max_logprob_err"] for r in results),
    }


def perturbed(model, rel: float, seed: int):
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1 + rel * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return other


def fewer_layers(model):
    """A cheaper model with the same tokenizer: every other decoder layer dropped."""
    import copy

    other = copy.deepcopy(model)
    layers = other.model.layers
    keep = torch.nn.ModuleList([layer for i, layer in enumerate(layers) if i % 2 == 0])
    for j, layer in enumerate(keep):
        layer.self_attn.layer_idx = j
    other.model.layers = keep
    other.config.num_hidden_layers = len(keep)
    if getattr(other.config, "layer_types", None):
        other.config.layer_types = other.config.layer_types[: len(keep)]
    return other


def digits(tok, ids: list[int]) -> int:
    return sum(ch.isdigit() for ch in tok.decode(ids))


def bench_model(name: str, quick: bool, rng: random.Random) -> list[dict]:
    model, tok = load_model(name, dtype="float32")
    pad = tok.pad_token_id
    eos = tuple(eos_token_ids(model, tok))
    max_tokens = 64 if name == "tiny" else 48
    params = SamplingParams(
        temperature=1.0, top_k=50, top_p=0.95, max_tokens=max_tokens, eos_token_ids=eos
    )
    scale = 0.125 if quick else 1.0
    per_cheat = max(4, int(50 * scale))
    cases: list[dict] = []
    next_seed = iter(range(10**6, 10**7))

    def fresh(count):
        prompts = make_prompts(tok, name, count, rng)
        seeds = [next(next_seed) for _ in prompts]
        samples = [rng.randrange(4) for _ in prompts]
        return prompts, seeds, samples

    def report(case, kind, results):
        s = summarise(case, kind, results)
        cases.append(s)
        print(f"  {name:14s} {case:34s} {s['flagged']:4d}/{s['n']:<4d} {s['by_check']}", flush=True)

    # Honest: batch sizes 1/8/32 with mixed prompt lengths, plus strongly uneven lengths.
    honest_pool: list[tuple[Rollout, list[int]]] = []
    for label, batch, count in (
        ("honest batch 1", 1, 16),
        ("honest batch 8", 8, 64),
        ("honest batch 32", 32, 96),
    ):
        count = max(batch, int(count * scale)) if batch > 1 else max(4, int(count * scale))
        prompts, seeds, samples = fresh(count)
        t0 = time.perf_counter()
        rolls = run(model, prompts, params, seeds, samples, batch, pad)
        gen_s = time.perf_counter() - t0
        honest_pool += [(r, p) for r, p in zip(rolls, prompts, strict=True)]
        report(
            f"{label} ({gen_s:.0f}s gen)",
            "honest",
            validate(
                model,
                [from_rollout(r, p) for r, p in zip(rolls, prompts, strict=True)],
                params,
                pad,
            ),
        )
    prompts, seeds, samples = fresh(max(8, int(32 * scale)))
    long = [p + p + p for p in prompts[::4]]  # a quarter of the prompts 3x longer
    prompts[::4] = long
    rolls = run(model, prompts, params, seeds, samples, 8, pad)
    report(
        "honest padding (3x length mix)",
        "honest",
        validate(
            model, [from_rollout(r, p) for r, p in zip(rolls, prompts, strict=True)], params, pad
        ),
    )

    # Cheats.
    other = load_model("tiny", init_seed=99)[0] if name == "tiny" else fewer_layers(model)
    other_label = "other model (tiny seed 99)" if name == "tiny" else "other model (15 layers)"
    prompts, seeds, samples = fresh(per_cheat)
    rolls = run(other, prompts, params, seeds, samples, 8, pad)
    report(
        other_label,
        "cheat",
        validate(
            model, [from_rollout(r, p) for r, p in zip(rolls, prompts, strict=True)], params, pad
        ),
    )

    noisy = perturbed(model, 0.01, seed=7)
    prompts, seeds, samples = fresh(per_cheat)
    rolls = run(noisy, prompts, params, seeds, samples, 8, pad)
    report(
        "weights + 1% relative noise",
        "cheat",
        validate(
            model, [from_rollout(r, p) for r, p in zip(rolls, prompts, strict=True)], params, pad
        ),
    )
    del noisy

    prompts, seeds, samples = fresh(per_cheat)
    changed = []
    for p in prompts:
        q = list(p)
        i = rng.randrange(len(q))
        q[i] = (q[i] + rng.randrange(1, len(tok) - 1)) % len(tok)
        changed.append(q)
    rolls = run(model, changed, params, seeds, samples, 8, pad)
    report(
        "one prompt token changed",
        "cheat",
        validate(
            model, [from_rollout(r, p) for r, p in zip(rolls, prompts, strict=True)], params, pad
        ),
    )

    subs = []
    for r, p in honest_pool[-per_cheat:]:
        c = list(r.completion_ids)
        i = rng.randrange(len(c))
        while True:
            t = rng.randrange(len(tok))
            if t != c[i] and t not in eos:
                break
        c[i] = t
        subs.append(honestly_prefilled(model, p, c, r.seed, r.sample_index, params, pad))
    report("one completion token changed (+prefill)", "cheat", validate(model, subs, params, pad))

    bf16 = load_model(name, dtype="bfloat16")[0]
    prompts, seeds, samples = fresh(per_cheat)
    rolls = run(bf16, prompts, params, seeds, samples, 8, pad)
    report(
        "bf16 inference claimed as fp32",
        "cheat",
        validate(
            model, [from_rollout(r, p) for r, p in zip(rolls, prompts, strict=True)], params, pad
        ),
    )
    del bf16

    prompts, seeds, samples = fresh(per_cheat)
    own_seeds = [rng.randrange(2**62) for _ in prompts]
    rolls = run(other, prompts, params, own_seeds, samples, 8, pad)
    subs = [
        honestly_prefilled(model, p, r.completion_ids, s, i, params, pad)
        for r, p, s, i in zip(rolls, prompts, seeds, samples, strict=True)
    ]
    report("other model's text + honest prefill", "cheat", validate(model, subs, params, pad))

    prompts, seeds, samples = fresh(per_cheat)
    candidates = [
        run(model, prompts, params, [rng.randrange(2**62) for _ in prompts], samples, 8, pad)
        for _ in range(4)
    ]
    subs = []
    for j, p in enumerate(prompts):
        best = max((c[j] for c in candidates), key=lambda r: digits(tok, r.completion_ids))
        subs.append(
            honestly_prefilled(model, p, best.completion_ids, seeds[j], samples[j], params, pad)
        )
    report("best-of-4 by reward (own RNG)", "cheat", validate(model, subs, params, pad))

    subs = []
    pool = [(r, p) for r, p in honest_pool if len(r.completion_ids) >= 2]
    for r, p in pool[:per_cheat]:
        n = rng.randrange(1, len(r.completion_ids))
        subs.append(
            Submission(
                p,
                r.completion_ids[:n],
                r.logprobs[:n],
                build_proofs(r.hidden[:n]),
                r.seed,
                r.sample_index,
            )
        )
    report("completion truncated early", "cheat", validate(model, subs, params, pad))

    subs = []
    for r, p in pool[per_cheat : 2 * per_cheat]:
        n = rng.randrange(1, len(r.completion_ids))
        c = [*r.completion_ids[: n - 1], eos[0]]
        subs.append(honestly_prefilled(model, p, c, r.seed, r.sample_index, params, pad))
    report("truncated + EOS forged (+prefill)", "cheat", validate(model, subs, params, pad))
    for c in cases:
        c["model"] = name
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="about 1/8 of the rollouts")
    ap.add_argument("--models", default="tiny,smollm2-135m")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(1234)
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime: {uptime_before}")
    t0 = time.perf_counter()
    cases = []
    for name in args.models.split(","):
        cases += bench_model(name, args.quick, rng)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"\n{'model':14s} {'case':42s} {'flagged':>9s}  caught by (toploc/sampling/term/logprob)")
    for c in cases:
        b = c["by_check"]
        print(
            f"{c['model']:14s} {c['case']:42s} {c['flagged']:4d}/{c['n']:<4d}  "
            f"{b['toploc']}/{b['sampling']}/{b['termination']}/{b['logprob']}"
        )
    honest = [c for c in cases if c["kind"] == "honest"]
    cheats = [c for c in cases if c["kind"] == "cheat"]
    print(
        f"honest rollouts: {sum(c['n'] for c in honest)}, false rejects: "
        f"{sum(c['flagged'] for c in honest)}; cheating rollouts: "
        f"{sum(c['n'] for c in cheats)}, caught: {sum(c['flagged'] for c in cheats)}"
    )
    print(f"uptime: {uptime_after}; wall {time.perf_counter() - t0:.0f}s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python bench/toploc_detection.py" + (" --quick" if args.quick else ""),
                "uptime_before": uptime_before,
                "uptime_after": uptime_after,
                "torch_threads": torch.get_num_threads(),
                "cases": cases,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
