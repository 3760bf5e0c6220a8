"""Speed table: proof build/verify per chunk, capture overhead, validation vs generation.

1. Build and verify time per 32 x H chunk (H = 576 and 4096): one chunk alone, and amortised
   over a batch of chunks (how a node proves a whole completion). CPU time and wall time.
2. Capture overhead of the `hf` engine: the same seeded generation with and without the
   final-norm hook, as a percentage of generation time; proof building likewise.
3. Validation (one prefill + TOPLOC check + sampling check + logprob check) against
   generation of the same SmolLM2 rollouts, as a ratio.

Runs alternate and the minimum of several repeats is kept: the machine is shared.

    python bench/toploc_speed.py [--quick] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# Other bench scripts are named like packages (bench/protocol.py would shadow `protocol`):
# import from the repository root, not from this script's folder.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from toploc import (  # noqa: E402
    SamplingParams,
    build_proofs,
    verify_logprobs,
    verify_proofs,
    verify_sampling,
)
from toploc.capture_hf import generate, prefill  # noqa: E402
from toploc.models import load_model  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "toploc_speed.json"


def timed(fn, repeats: int) -> tuple[float, float]:
    """Minimum (cpu seconds, wall seconds) of `repeats` calls."""
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return min(cpu), min(wall)


def proof_speed(quick: bool) -> list[dict]:
    rows = []
    reps = 3 if quick else 10
    for width in (576, 4096):
        for chunks in (1, 32):
            g = torch.Generator().manual_seed(width + chunks)
            hidden = torch.randn(32 * chunks, width, generator=g).to(torch.bfloat16)
            proofs = build_proofs(hidden)
            noisy = hidden.float() * (1 + 1e-2 * torch.randn(hidden.shape, generator=g))
            noisy = noisy.to(torch.bfloat16)
            assert all(v.ok for v in verify_proofs(noisy, proofs))
            b_cpu, b_wall = timed(lambda h=hidden: build_proofs(h), reps)
            v_cpu, v_wall = timed(lambda n=noisy, p=proofs: verify_proofs(n, p), reps)
            rows.append(
                {
                    "H": width,
                    "chunks_per_call": chunks,
                    "build_ms_cpu": 1e3 * b_cpu / chunks,
                    "build_ms_wall": 1e3 * b_wall / chunks,
                    "verify_ms_cpu": 1e3 * v_cpu / chunks,
                    "verify_ms_wall": 1e3 * v_wall / chunks,
                }
            )
    return rows


def prompts_for(tok, name: str, count: int) -> list[list[int]]:
    out = []
    for i in range(count):
        q = f"What is {17 * i + 3} + {29 * i + 5}?" + " Explain briefly." * (i % 3)
        if name == "tiny":
            out.append(tok(q).input_ids)
        else:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
            )
            out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def engine_speed(name: str, quick: bool) -> dict:
    model, tok = load_model(name)
    batch = 8
    max_tokens = 32 if quick else 64
    # No EOS, so every repeat does the same amount of work.
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, max_tokens=max_tokens)
    prompts = prompts_for(tok, name, batch)
    seeds = list(range(batch))
    pad = tok.pad_token_id

    def gen(capture: bool):
        return generate(model, prompts, params, seeds, pad_token_id=pad, capture=capture)

    gen(True)  # warm up
    reps = 2 if quick else 4
    on_cpu, off_cpu, on_wall, off_wall = [], [], [], []
    for _ in range(reps):  # alternate, so load changes hit both alike
        c, w = timed(lambda: gen(True), 1)
        on_cpu.append(c)
        on_wall.append(w)
        c, w = timed(lambda: gen(False), 1)
        off_cpu.append(c)
        off_wall.append(w)
    rollouts = gen(True)
    prove_cpu, _ = timed(lambda: [build_proofs(r.hidden) for r in rollouts], reps)
    subs = [(r, build_proofs(r.hidden)) for r in rollouts]

    def validate():
        pfs = prefill(
            model,
            [r.prompt_ids for r, _ in subs],
            [r.completion_ids for r, _ in subs],
            pad_token_id=pad,
        )
        ok = True
        for (r, p), pf in zip(subs, pfs, strict=True):
            ok &= all(v.ok for v in verify_proofs(pf.hidden, p))
            ok &= verify_sampling(pf.logits, r.completion_ids, r.seed, params, 0).ok
            ok &= verify_logprobs(pf.logits, r.completion_ids, r.logprobs, params).ok
        assert ok
        return ok

    val_cpu, val_wall = timed(validate, reps)
    gen_cpu, gen_wall = min(on_cpu), min(on_wall)
    return {
        "model": name,
        "batch": batch,
        "tokens_per_rollout": max_tokens,
        "gen_s_cpu_capture": gen_cpu,
        "gen_s_cpu_no_capture": min(off_cpu),
        "gen_s_wall_capture": gen_wall,
        "gen_s_wall_no_capture": min(off_wall),
        "capture_overhead_pct_cpu": 100 * (gen_cpu - min(off_cpu)) / min(off_cpu),
        "capture_overhead_pct_wall": 100 * (gen_wall - min(off_wall)) / min(off_wall),
        "proof_build_pct_of_gen_cpu": 100 * prove_cpu / gen_cpu,
        "validate_s_cpu": val_cpu,
        "validate_s_wall": val_wall,
        "gen_over_validate_cpu": gen_cpu / val_cpu,
        "gen_over_validate_wall": gen_wall / val_wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    up0 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime: {up0}; torch threads {torch.get_num_threads()}")
    proofs = proof_speed(args.quick)
    print(
        f"\n{'H':>5s} {'chunks/call':>11s} {'build ms/chunk':>15s} {'verify ms/chunk':>16s}"
        "   (CPU time; wall in brackets)"
    )
    for r in proofs:
        print(
            f"{r['H']:5d} {r['chunks_per_call']:11d} "
            f"{r['build_ms_cpu']:7.2f} ({r['build_ms_wall']:5.2f}) "
            f"{r['verify_ms_cpu']:8.2f} ({r['verify_ms_wall']:5.2f})"
        )
    eng = engine_speed(args.model, args.quick)
    print(f"\n{eng['model']}: batch {eng['batch']} x {eng['tokens_per_rollout']} tokens")
    print(
        f"  generation {eng['gen_s_cpu_no_capture']:.2f}s CPU without capture, "
        f"{eng['gen_s_cpu_capture']:.2f}s with: capture overhead "
        f"{eng['capture_overhead_pct_cpu']:+.1f}% CPU ({eng['capture_overhead_pct_wall']:+.1f}%"
        " wall)"
    )
    print(f"  proof building: {eng['proof_build_pct_of_gen_cpu']:.2f}% of generation CPU time")
    print(
        f"  validation {eng['validate_s_cpu']:.2f}s CPU: generation / validation = "
        f"{eng['gen_over_validate_cpu']:.1f}x CPU ({eng['gen_over_validate_wall']:.1f}x wall)"
    )
    up1 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime: {up1}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python bench/toploc_speed.py" + (" --quick" if args.quick else ""),
                "uptime_before": up0,
                "uptime_after": up1,
                "torch_threads": torch.get_num_threads(),
                "proofs": proofs,
                "engine": eng,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
