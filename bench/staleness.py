"""Does off-policy correction keep learning on track when samples come from older weights?

The bare GRPO loop (trainer.local: seeded generation with the node's sampler, rewards as the
coordinator computes them, the coordinator's `GRPOTrainer`) on the tiny preset, except that
every step's groups are generated with the weights from k steps ago, as an asynchronous swarm
delivers them. Each staleness k runs twice from the same seed: `behaviour` (the ratio against
the nodes' logprobs, today's default) and `decoupled` (the ratio against the trainer's policy,
truncated importance weights, IcePop masking). The final reward is that of the final weights:
sampled (temperature 1, as training samples) on held-out prompts.

The tiny preset's settings as a new pool gets them (16 prompts x 8 samples, lr 2e-3, no is_cap
band). At lr 1e-2 the tiny policy collapses to one answer within ~30 steps even on-policy,
so the comparison would measure the collapse, not the correction.

    python bench/staleness.py --quick                 # 20 steps, one seed: under 3 min, one core
    python bench/staleness.py --staleness 8 --first-seed 1 --json k8s1.json   # one slice
    python bench/staleness.py --from k*.json          # table and plot of slices run separately
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import deque
from copy import deepcopy
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/protocol.py shadows protocol

import torch

from toploc.models import eos_token_ids, load_model
from toploc.sampling import SamplingParams
from trainer.algorithm import GroupAlgorithm
from trainer.config import AlgorithmSection
from trainer.grpo import GRPOTrainer
from trainer.local import sample_groups
from trainer.presets import PRESETS
from trainer.tasks import make_task

DOCS = Path(__file__).resolve().parents[1] / "docs"
RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("behaviour", "decoupled")


def run_cell(
    staleness: int, mode: str, seed: int, steps: int, lr: float, prompts: int, eval_prompts: int
) -> dict[str, Any]:
    """Train the tiny preset for `steps` steps on groups from the weights `staleness` steps old
    with one off-policy mode; the reward curve and the final weights' held-out reward."""
    preset = PRESETS["tiny"]
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, tok = load_model(preset["model"]["name"], "float32")
    behind = deepcopy(model)  # the nodes' copy of the weights, `staleness` versions old
    task = make_task(preset["task"]["name"], seed, preset["task"]["options"])
    sampling = preset["sampling"]
    params = SamplingParams(
        temperature=1.0,
        max_tokens=sampling["max_new_tokens"],
        eos_token_ids=tuple(eos_token_ids(model, tok)),
    )
    algo = AlgorithmSection(
        **{
            **preset["algorithm"],
            "lr": lr,
            "batch_prompts": prompts,
            "off_policy": mode,
            "micro_batch": 128,
        }
    )
    trainer = GRPOTrainer(
        model, algo, 1.0, sampling["max_new_tokens"], pad_token_id=tok.pad_token_id
    )
    algorithm = GroupAlgorithm(algo.scale_rewards)
    group = sampling["group_size"]
    # versions[0] is the oldest kept: the one generating this step.
    versions = deque([deepcopy(model.state_dict())], maxlen=staleness + 1)
    curve = []
    for step in range(steps):
        behind.load_state_dict(versions[0])
        examples = rng.sample(task.train, algo.batch_prompts)
        groups, rewards = sample_groups(
            behind,
            tok,
            task,
            examples,
            params,
            rng,
            group,
            max(0, step - staleness),
            algorithm,
        )
        point = {"step": step, "reward": sum(map(sum, rewards)) / sum(map(len, rewards))}
        if groups:
            m = trainer.step(algorithm.batch(groups), step).metrics
            point.update(
                {
                    k: m.get(k)
                    for k in (
                        "staleness_mean",
                        "tis_weight_mean",
                        "icepop_masked_frac",
                        "is_masked_frac",
                        "clip_low_frac",
                        "clip_high_frac",
                        "mismatch_kl",
                        "entropy",
                    )
                }
            )
        versions.append(deepcopy(model.state_dict()))
        curve.append(point)
    # The final weights, sampled on held-out prompts: the same draw for every cell of a seed.
    eval_rng = random.Random(seed + 1)
    held_out = task.test[:eval_prompts]
    _, eval_rewards = sample_groups(
        model, tok, task, held_out, params, eval_rng, group, steps, algorithm
    )
    tail = curve[-max(1, steps // 5) :]
    return {
        "staleness": staleness,
        "mode": mode,
        "seed": seed,
        "lr": lr,
        "prompts": prompts,
        "final_reward": sum(map(sum, eval_rewards)) / sum(map(len, eval_rewards)),
        "train_reward_last_20pct": sum(p["reward"] for p in tail) / len(tail),
        "curve": curve,
    }


def summarise(cells: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean final reward (and its spread over seeds) per (staleness, mode)."""
    out: dict[str, dict[str, float]] = {}
    for key in sorted({(c["staleness"], c["mode"]) for c in cells}):
        mine = [c for c in cells if (c["staleness"], c["mode"]) == key]
        finals = [c["final_reward"] for c in mine]
        mean = sum(finals) / len(finals)
        out[f"k={key[0]} {key[1]}"] = {
            "staleness": key[0],
            "mode": key[1],
            "final_reward": mean,
            "final_reward_min": min(finals),
            "final_reward_max": max(finals),
            "train_reward_last_20pct": sum(c["train_reward_last_20pct"] for c in mine) / len(mine),
            "seeds": len(mine),
        }
    return out


def table(summary: dict[str, dict[str, float]]) -> str:
    ks = sorted({int(s["staleness"]) for s in summary.values()})
    lines = [
        "| staleness k | final reward, behaviour | final reward, decoupled "
        "| train reward (last 20%), behaviour | decoupled |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for k in ks:
        b, d = summary[f"k={k} behaviour"], summary[f"k={k} decoupled"]
        lines.append(
            f"| {k} | {_cell(b)} | {_cell(d)} "
            f"| {b['train_reward_last_20pct']:.3f} | {d['train_reward_last_20pct']:.3f} |"
        )
    return "\n".join(lines)


def _cell(s: dict[str, float]) -> str:
    if s["seeds"] == 1:
        return f"{s['final_reward']:.3f}"
    return f"{s['final_reward']:.3f} ({s['final_reward_min']:.3f}-{s['final_reward_max']:.3f})"


def plot(cells: list[dict[str, Any]], path: Path) -> bool:
    """Reward curves, one panel per staleness; False when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({c["staleness"] for c in cells})
    fig, axes = plt.subplots(1, len(ks), figsize=(4 * len(ks), 3.5), squeeze=False, sharey=True)
    for ax, k in zip(axes[0], ks, strict=True):
        for mode in MODES:
            runs = [c["curve"] for c in cells if c["staleness"] == k and c["mode"] == mode]
            steps = min(len(r) for r in runs)
            mean = [sum(r[i]["reward"] for r in runs) / len(runs) for i in range(steps)]
            window = max(1, steps // 10)
            smooth = [
                sum(mean[max(0, i - window + 1) : i + 1])
                / len(mean[max(0, i - window + 1) : i + 1])
                for i in range(steps)
            ]
            ax.plot(range(steps), smooth, label=mode)
        ax.set_title(f"staleness k = {k}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"train reward (mean of {window} steps)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def _rounded(value: Any) -> Any:
    """Floats to 6 digits: the curves are noise below that, and the file stays small."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def train_all(args: argparse.Namespace, steps: int, seeds: int) -> list[dict[str, Any]]:
    torch.set_num_threads(1)  # the budget is one core's
    cells, t0 = [], time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + seeds):
        for k in args.staleness:
            for mode in MODES:
                c = run_cell(k, mode, seed, steps, args.lr, args.prompts, args.eval_prompts)
                cells.append(c)
                print(
                    f"seed {seed} k={k} {mode:9s} final reward {c['final_reward']:.3f} "
                    f"({time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="20 steps, one seed (< 3 min)")
    ap.add_argument("--steps", type=int, help="optimizer steps per run (default 150)")
    ap.add_argument("--seeds", type=int, help="seeds per cell (default 3)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 2, 4, 8])
    ap.add_argument("--lr", type=float, default=PRESETS["tiny"]["algorithm"]["lr"])
    ap.add_argument("--prompts", type=int, default=PRESETS["tiny"]["algorithm"]["batch_prompts"])
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--json", type=Path, help="write the cells and the summary here")
    ap.add_argument(
        "--plot", type=Path, help="default: docs/staleness.png, or bench/results/ under --quick"
    )
    ap.add_argument(
        "--from", dest="sources", type=Path, nargs="+", help="no training: merge these JSONs"
    )
    args = ap.parse_args()
    steps = args.steps if args.steps is not None else (20 if args.quick else 150)
    # A smoke run must not overwrite the plot the docs show.
    plot_path = args.plot or (
        RESULTS / "staleness_quick.png" if args.quick else DOCS / "staleness.png"
    )
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if min(steps, seeds, args.prompts, args.eval_prompts) < 1 or min(args.staleness) < 0:
        ap.error("--steps, --seeds, --prompts, --eval-prompts must be positive, --staleness >= 0")
    if args.sources:
        cells = [c for f in args.sources for c in json.loads(f.read_text())["cells"]]
    else:
        cells = train_all(args, steps, seeds)
    summary = summarise(cells)
    runs = sorted({(len(c["curve"]), c["lr"], c["prompts"]) for c in cells})
    print(f"\ntiny preset, (steps, lr, prompts) {runs}, seeds per cell: see the table\n")
    print(table(summary))
    if args.json:
        args.json.write_text(json.dumps(_rounded({"summary": summary, "cells": cells})))
        print(f"wrote {args.json}")
    if plot(cells, plot_path):
        print(f"wrote {plot_path}")


if __name__ == "__main__":
    main()
