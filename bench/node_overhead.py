"""What a node's verifiability costs: its full path against the bare engine, in one run.

    transformers: `model.generate` (KV cache, multinomial sampling): what a user would run
    engine:       the node's own KV-cache loop with the seeded sampler, capture off
    node:         the same loop capturing final-norm rows, TOPLOC proofs, then the signed
                  submission sent over libp2p to a receiver on 127.0.0.1

All generate the same prompts x G samples with the same batch and length cap; rounds alternate
so machine noise hits all alike. The receiver answers with a receipt and does no validation, so
the figure is the node's own cost. The overhead is node against engine (capture, proofs,
signing, transport); the seeded sampler's own cost against `torch.multinomial` is measured
separately on logits of the model's vocabulary.

    python bench/node_overhead.py                # SmolLM2-135M-Instruct (bf16), 4 prompts x 8
    python bench/node_overhead.py --model tiny --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import trio

# The repo root first: bench/protocol.py would otherwise shadow the `protocol` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.engine import HFEngine, offline_lease, sampling_params
from protocol import messages as msg
from protocol.host import Host
from protocol.identity import Identity
from toploc.capture_hf import generate
from toploc.models import eos_token_ids, load_model, model_dir
from toploc.sampling import SamplingParams, sample
from trainer.tasks import make_task

RESULTS = Path(__file__).parent / "results"
SINK = "/swarmrl/bench-sink/1.0.0"


def make_lease(tok, eos: list[int], prompts: int, group: int, max_new: int, seed: int) -> msg.Lease:
    task = make_task("arithmetic", seed)
    ids = [
        tok(task.render(task.train[i], tok), add_special_tokens=False)["input_ids"]
        for i in range(prompts)
    ]
    return offline_lease(
        ids, group_size=group, max_new_tokens=max_new, eos_token_ids=eos, first_seed=1000
    )


@torch.no_grad()
def bare(model, tok, lease: msg.Lease, batch: int) -> tuple[float, int]:
    """transformers' own sampling loop over the same sequences; (seconds, tokens)."""
    seqs = [t.prompt_ids for t in lease.tasks for _ in range(t.group_size)]
    tokens, t0 = 0, time.perf_counter()
    for start in range(0, len(seqs), batch):
        part = seqs[start : start + batch]
        width = max(len(s) for s in part)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in part])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in part])
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            max_new_tokens=lease.sampling.max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=list(lease.sampling.eos_token_ids),
        )
        new = out[:, width:]
        for row in new:
            # up to and including the first EOS, as the node counts
            eos = [i for i, t in enumerate(row.tolist()) if t in lease.sampling.eos_token_ids]
            tokens += (eos[0] + 1) if eos else len(row)
    return time.perf_counter() - t0, tokens


@torch.no_grad()
def engine_loop(
    engine: HFEngine, lease: msg.Lease, batch: int, share_prefill: bool = True
) -> tuple[float, int]:
    """The node's generation loop without capture or proofs; (seconds, tokens).
    `share_prefill=False`: every sample prefills its prompt again (before the shared prefill)."""
    jobs = [(t.prompt_ids, t.seed, j) for t in lease.tasks for j in range(t.group_size)]
    params, tokens, t0 = sampling_params(lease), 0, time.perf_counter()
    for start in range(0, len(jobs), batch):
        part = jobs[start : start + batch]
        rollouts = generate(
            engine.model,
            [p for p, _, _ in part],
            params,
            [s for _, s, _ in part],
            sample_indices=[j for *_, j in part],
            pad_token_id=engine.pad_token_id,
            capture=False,
            share_prefill=share_prefill,
        )
        tokens += sum(len(r.completion_ids) for r in rollouts)
    return time.perf_counter() - t0, tokens


def sampler_cost(vocab: int, batch: int, reps: int = 50) -> dict[str, float]:
    """Milliseconds per decoding step: the seeded Gumbel-max sampler vs torch.multinomial."""
    logits = torch.randn(batch, vocab)
    params = SamplingParams(temperature=1.0)
    idx = torch.arange(batch)

    def seeded() -> None:
        sample(logits, params, idx + 7, idx, idx)

    def multinomial() -> None:
        torch.multinomial(torch.softmax(logits, dim=-1), 1)

    out = {}
    for name, fn in (("seeded_ms", seeded), ("multinomial_ms", multinomial)):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out[name] = (time.perf_counter() - t0) / reps * 1000
    return out


async def node_path(engine: HFEngine, lease: msg.Lease, pool: str) -> tuple[float, int, dict]:
    """The node's generation, proofs and signed submission to a receiver; (seconds, tokens,
    breakdown)."""
    node_id, sink_id = Identity.generate(), Identity.generate()
    async with Host.open(sink_id, pool) as sink, Host.open(node_id, pool) as node:

        async def receipt(v):
            return msg.Receipt(lease_id=v.message.lease_id, queued=True)

        sink.serve(SINK, receipt, msg.Submission, msg.Receipt)
        await node.connect(sink.addrs[0])
        t0 = time.perf_counter()
        results = await trio.to_thread.run_sync(engine.generate, lease)
        t1 = time.perf_counter()
        submission = msg.Submission(lease_id=1, weight_version=0, results=results)
        await node.request(sink.addrs[0], SINK, submission, msg.Receipt, timeout_s=120)
        t2 = time.perf_counter()
    tokens = sum(len(c.tokens) for r in results for c in r.completions)
    return t2 - t0, tokens, {"generate_prove_s": t1 - t0, "sign_send_s": t2 - t1}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 for smollm2, float32 else")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 round, 2 prompts x 4")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.prompts, args.group = 1, 2, 4
    dtype = args.dtype or ("bfloat16" if args.model.startswith("smollm2") else "float32")
    torch.manual_seed(0)
    model, tok = load_model(args.model, dtype)
    engine = HFEngine("cpu", dtype, args.batch)
    engine.load(model_dir(args.model), 0)
    lease = make_lease(
        tok, eos_token_ids(model, tok), args.prompts, args.group, args.max_new_tokens, 0
    )
    bare(model, tok, lease, args.batch)  # warm-up: first calls allocate caches
    trio.run(node_path, engine, lease, "a" * 24)

    rows = []
    for r in range(args.rounds):
        b_s, b_tok = bare(model, tok, lease, args.batch)
        e_s, e_tok = engine_loop(engine, lease, args.batch)
        u_s, u_tok = engine_loop(engine, lease, args.batch, share_prefill=False)
        n_s, n_tok, parts = trio.run(node_path, engine, lease, "a" * 24)
        rows.append(
            {
                "round": r,
                "bare_s": b_s,
                "bare_tokens": b_tok,
                "engine_s": e_s,
                "engine_tokens": e_tok,
                "unshared_s": u_s,
                "unshared_tokens": u_tok,
                "node_s": n_s,
                "node_tokens": n_tok,
                **parts,
            }
        )
        print(
            f"round {r}: transformers {b_tok / b_s:.1f}, engine {e_tok / e_s:.1f} "
            f"(every sample prefilled: {u_tok / u_s:.1f}), "
            f"node {n_tok / n_s:.1f} tok/s",
            flush=True,
        )
    sequences = args.prompts * args.group

    def med(key: str) -> tuple[float, float]:
        tps = statistics.median(r[f"{key}_tokens"] / r[f"{key}_s"] for r in rows)
        return tps, statistics.median(sequences / r[f"{key}_s"] for r in rows)

    (bare_tps, bare_rps), (engine_tps, engine_rps), (node_tps, node_rps) = map(
        med, ("bare", "engine", "node")
    )
    unshared_tps, unshared_rps = med("unshared")
    send = statistics.median(r["sign_send_s"] / r["node_s"] for r in rows)
    overhead = 1 - node_tps / engine_tps
    sampler = sampler_cost(len(tok), args.batch)
    print()
    print(
        f"{args.model} ({dtype}), {args.prompts} prompts x {args.group} samples, batch "
        f"{args.batch}, up to {args.max_new_tokens} new tokens, median of {args.rounds} rounds"
    )
    print("| path | tokens/s | rollouts/s |")
    print("| --- | ---: | ---: |")
    print(f"| transformers generate | {bare_tps:.1f} | {bare_rps:.2f} |")
    print(
        f"| engine loop, every sample prefilled (before) | {unshared_tps:.1f} | "
        f"{unshared_rps:.2f} |"
    )
    print(f"| engine loop (seeded sampler, no capture) | {engine_tps:.1f} | {engine_rps:.2f} |")
    print(f"| node (+ capture, proofs, sign, send) | {node_tps:.1f} | {node_rps:.2f} |")
    print(
        f"node overhead over the engine: {overhead:+.1%} of tokens/s (target <= 10%); "
        f"signing and sending {send:.1%} of the node's time"
    )
    speedup = engine_tps / unshared_tps
    print(f"prompt prefilled once per group: {speedup:.2f}x the engine's tokens/s")
    print(
        f"seeded sampler {sampler['seeded_ms']:.2f} ms vs multinomial "
        f"{sampler['multinomial_ms']:.2f} ms per step of {args.batch} x {len(tok)} logits"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("node_overhead_quick.json" if args.quick else "node_overhead.json")
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "dtype": dtype,
                "prompts": args.prompts,
                "group": args.group,
                "batch": args.batch,
                "max_new_tokens": args.max_new_tokens,
                "rounds": rows,
                "transformers_tokens_per_s": bare_tps,
                "engine_tokens_per_s": engine_tps,
                "engine_every_sample_prefilled_tokens_per_s": unshared_tps,
                "shared_prefill_speedup": engine_tps / unshared_tps,
                "node_tokens_per_s": node_tps,
                "transformers_rollouts_per_s": bare_rps,
                "engine_rollouts_per_s": engine_rps,
                "node_rollouts_per_s": node_rps,
                "overhead": overhead,
                "sign_send_fraction": send,
                "sampler": sampler,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
