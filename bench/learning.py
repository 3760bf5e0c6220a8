"""How fast the trainer learns, without the network: the bare on-policy GRPO loop.

Seeded generation (the node's sampler), rewards computed as the coordinator does, and the
coordinator's `GRPOTrainer`, in one process. Greedy accuracy on the held-out split before and
after (`coordinator eval`'s code), the reward curve over time, trainer tokens/s and seconds per
step. The swarm adds network, proofs and validation on top; this is the curve it should approach.

    python bench/learning.py --preset tiny        # toy task, a few minutes
    python bench/learning.py --preset smollm2     # SmolLM2-135M on 2-digit addition
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/protocol.py shadows protocol

from trainer.local import train_locally
from trainer.presets import local_config

RESULTS = Path(__file__).parent / "results"

# Each run is a `coordinator init` preset (trainer/presets.py) with a time budget.
RUNS = {
    "tiny": local_config("tiny", minutes=4.0),
    "smollm2": local_config("smollm2-135m", minutes=6.0),
}


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items(), strict=True):
        t = [p["time_s"] / 60 for p in r["curve"]]
        y = [p["reward"] for p in r["curve"]]
        window = max(1, len(y) // 20)
        smooth = [
            sum(y[max(0, i - window + 1) : i + 1]) / len(y[max(0, i - window + 1) : i + 1])
            for i in range(len(y))
        ]
        ax.plot(t, y, alpha=0.3, label="per step")
        ax.plot(t, smooth, label=f"mean of {window}")
        ax.set_title(
            f"{name}: {r['model']} on {r['task']} "
            f"(greedy acc {r['accuracy_before']:.0%} -> {r['accuracy_after']:.0%})"
        )
        ax.set_xlabel("minutes")
        ax.set_ylabel("mean reward")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--preset",
        action="append",
        choices=sorted(RUNS),
        help="which run(s) (default: tiny and smollm2)",
    )
    ap.add_argument("--minutes", type=float, help="override each run's time budget")
    ap.add_argument("--eval-limit", type=int, default=100)
    args = ap.parse_args()
    results = {}
    for name in args.preset or ["tiny", "smollm2"]:
        cfg = dict(RUNS[name])
        if args.minutes:
            cfg["minutes"] = args.minutes
        print(
            f"{name}: {cfg['model']} on {cfg['task']} {cfg['options']} for {cfg['minutes']} min",
            flush=True,
        )
        results[name] = train_locally(cfg, eval_limit=args.eval_limit)
    print()
    print(
        "| run | steps | s/step | trainer tok/s | reward first 10% -> last 10% | "
        "greedy accuracy before -> after |"
    )
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for name, r in results.items():
        rewards = f"{r['reward_first_10pct']:.2f} -> {r['reward_last_10pct']:.2f}"
        accuracy = f"{r['accuracy_before']:.0%} -> {r['accuracy_after']:.0%}"
        print(
            f"| {name} ({r['model']}, {r['task']}) | {r['steps']} | {r['seconds_per_step']:.2f} "
            f"| {r['trainer_tokens_per_s']:.0f} | {rewards} | {accuracy} |"
        )
    RESULTS.mkdir(exist_ok=True)
    tag = "_".join(results)
    (RESULTS / f"learning_{tag}.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / f"learning_{tag}.png")
    print(f"wrote {RESULTS / f'learning_{tag}.json'} and .png")


if __name__ == "__main__":
    main()
