"""The seeded sampler's replay (what a validator runs for every rollout) by block size: 256
rows of SmolLM2's vocabulary (49,152), logits of two spreads, the tokens the seeded sampler's
own (so every rollout passes) and, beside them, random ones as a lying node would send (to show
they cost the validator no more), one torch thread, best of 3. A block never spans two cases;
the baseline, in the same run, is one block per case (all 32 of its rows).

    python bench/replay.py --json bench/results/replay.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toploc import sampling

ROWS, VOCAB, ROLLOUT = 256, 49152, 32
BLOCKS = (1 << 14, 1 << 16, 1 << 18, 1 << 20, ROLLOUT * VOCAB)


def replay_seconds(logits: torch.Tensor, block: int, device: str, forged: bool) -> float:
    """Best of 3 replays of 8 rollouts of 32 rows; `forged`: tokens drawn at random instead of
    by the seeded sampler, as a lying node would send (every rollout then fails)."""
    params = sampling.SamplingParams(temperature=1.0, max_tokens=ROLLOUT)
    row = torch.arange(ROWS, device=logits.device)
    if forged:
        tokens = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(1))
    else:
        seeds = torch.full_like(row, 7)
        tokens = sampling.sample(logits, params, seeds, row // ROLLOUT, row % ROLLOUT)
    cases = [
        sampling.SamplingCase(
            logits[i : i + ROLLOUT], tokens[i : i + ROLLOUT].tolist(), 7, i // ROLLOUT
        )
        for i in range(0, ROWS, ROLLOUT)
    ]
    sampling.REPLAY_BLOCK[device] = block
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        verdicts = sampling.verify_sampling_many(cases, params)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    if any(v.ok for v in verdicts) if forged else not all(v.ok for v in verdicts):
        raise RuntimeError("the replay's verdicts are wrong: honest rejected or forged accepted")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for spread in (1.0, 3.0):
        logits = (torch.randn(ROWS, VOCAB) * spread).to(args.device)
        whole = replay_seconds(logits, BLOCKS[-1], args.device, forged=False)
        for block in BLOCKS:
            s = replay_seconds(logits, block, args.device, forged=False)
            forged = replay_seconds(logits, block, args.device, forged=True)
            rows.append(
                {"spread": spread, "block": block, "s": s, "forged_s": forged,
                 "speedup_vs_case_block": whole / s}
            )  # fmt: skip
    print(f"{'spread':>6} {'block entries':>14} {'s per 256 rows':>15} {'forged tokens':>14} "
          f"{'vs case block':>13}")  # fmt: skip
    for r in rows:
        print(f"{r['spread']:6} {r['block']:14} {r['s']:15.3f} {r['forged_s']:14.3f} "
              f"{r['speedup_vs_case_block']:12.2f}x")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": args.device, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
