"""What a node's verifiability costs: its full path against the bare engine, in one run.

    bare:   transformers `generate` (KV cache, multinomial sampling), same prompts, same batch
    node:   seeded Gumbel-max sampling + final-norm capture (capture_hf.generate), TOPLOC proofs,
            then the signed submission sent over libp2p to a receiver on 127.0.0.1

Both generate the same prompts x G samples with the same batch and length cap; rounds
alternate so machine noise hits both alike. The receiver answers with a receipt and does no
validation, so the figure is the node's own cost.

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

from node.engine import HFEngine
from protocol import messages as msg
from protocol.host import Host
from protocol.identity import Identity
from toploc.models import eos_token_ids, load_model, model_dir
from trainer.tasks import make_task

RESULTS = Path(__file__).parent / "results"
SINK = "/swarmrl/bench-sink/1.0.0"


def make_lease(tok, eos: list[int], prompts: int, group: int, max_new: int, seed: int) -> msg.Lease:
    task = make_task("arithmetic", seed)
    tasks = [
        msg.LeaseTask(
            prompt_index=i,
            prompt_ids=tok(task.render(task.train[i], tok), add_special_tokens=False)["input_ids"],
            seed=1000 + i,
            group_size=group,
        )
        for i in range(prompts)
    ]
    return msg.Lease(
        lease_id=1,
        node=bytes(32),
        counter=0,
        weight_version=0,
        min_version=0,
        tasks=tasks,
        sampling=msg.SamplingWire(
            temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new, eos_token_ids=eos
        ),
        deadline_ms=2**62,
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
        n_s, n_tok, parts = trio.run(node_path, engine, lease, "a" * 24)
        rows.append(
            {
                "round": r,
                "bare_s": b_s,
                "bare_tokens": b_tok,
                "node_s": n_s,
                "node_tokens": n_tok,
                **parts,
            }
        )
        print(f"round {r}: bare {b_tok / b_s:.1f} tok/s, node {n_tok / n_s:.1f} tok/s", flush=True)
    bare_tps = statistics.median(r["bare_tokens"] / r["bare_s"] for r in rows)
    node_tps = statistics.median(r["node_tokens"] / r["node_s"] for r in rows)
    sequences = args.prompts * args.group
    bare_rps = statistics.median(sequences / r["bare_s"] for r in rows)
    node_rps = statistics.median(sequences / r["node_s"] for r in rows)
    send = statistics.median(r["sign_send_s"] / r["node_s"] for r in rows)
    overhead = 1 - node_tps / bare_tps
    print()
    print(
        f"{args.model} ({dtype}), {args.prompts} prompts x {args.group} samples, batch "
        f"{args.batch}, up to {args.max_new_tokens} new tokens, median of {args.rounds} rounds"
    )
    print("| path | tokens/s | rollouts/s |")
    print("| --- | ---: | ---: |")
    print(f"| bare transformers generate | {bare_tps:.1f} | {bare_rps:.2f} |")
    print(
        f"| node (seeded sampling, capture, proofs, sign, send) | {node_tps:.1f} | {node_rps:.2f} |"
    )
    print(
        f"overhead in tokens/s: {overhead:+.1%} (target <= 10%); signing and sending "
        f"{send:.1%} of the node's time"
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
                "bare_tokens_per_s": bare_tps,
                "node_tokens_per_s": node_tps,
                "bare_rollouts_per_s": bare_rps,
                "node_rollouts_per_s": node_rps,
                "overhead": overhead,
                "sign_send_fraction": send,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
