"""How fast the trainer learns, without the network: the bare on-policy GRPO loop.

Seeded generation (the node's sampler), rewards computed as the coordinator does, and the
coordinator's `GRPOTrainer`, in one process. Greedy accuracy on the held-out split before and
after (`coordinator eval`'s code), the reward curve over time, trainer tokens/s and seconds per
step. The swarm adds network, proofs and validation on top; this is the curve it should approach.

    python bench/learning.py --preset tiny        # toy task, a few minutes
    python bench/learning.py --preset smollm2     # SmolLM2-135M on 2-digit addition
    python bench/learning.py --preset smollm2 --step-speed 840a85e --prompts 2
        # optimizer steps of this tree's trainer against trainer/grpo.py at a git revision,
        # alternated in one process on the same batch (the ratio survives a noisy machine)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/protocol.py shadows protocol

import torch

from toploc.models import load_model, resolve_dtype
from trainer.grpo import GRPOTrainer, Sample, TrainGroup
from trainer.local import local_algorithm, train_locally
from trainer.presets import local_config
from trainer.tasks import make_task

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


def trainer_at(revision: str) -> type:
    """`GRPOTrainer` as trainer/grpo.py was at a git revision (the rest of the tree as now)."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{revision}:trainer/grpo.py"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType(f"grpo_{revision}")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{revision}:trainer/grpo.py", "exec"), module.__dict__)
    return module.GRPOTrainer


def synthetic_groups(cfg: dict, tok, vocab: int, seed: int = 0) -> list[TrainGroup]:
    """A batch shaped like the preset's (its prompts, `group` completions of max_new_tokens / 2
    to max_new_tokens random tokens each): a step's cost depends on shapes, not on text."""
    rng = random.Random(seed)
    task = make_task(cfg["task"], seed, cfg["options"])
    groups = []
    for i, example in enumerate(rng.sample(task.train, cfg["prompts"])):
        prompt = tok(task.render(example, tok), add_special_tokens=False)["input_ids"]
        lengths = [
            rng.randint(cfg["max_new_tokens"] // 2, cfg["max_new_tokens"])
            for _ in range(cfg["group"])
        ]
        samples = [
            Sample(prompt, [rng.randrange(vocab) for _ in range(n)], [-1.0] * n, False)
            for n in lengths
        ]
        rewards = [float(j % 2) for j in range(cfg["group"])]
        groups.append(TrainGroup(samples, rewards, [r - 0.5 for r in rewards], 0, i))
    return groups


def step_speed(cfg: dict, revision: str, repeats: int) -> dict:
    """Seconds per `GRPOTrainer.step` for this tree and for `revision`, alternated in one
    process on one batch, the first step of each left out (allocator warm-up)."""
    model, tok = load_model(cfg["model"], "float32")
    groups = synthetic_groups(cfg, tok, model.config.vocab_size)
    algo = local_algorithm(cfg)
    kinds = {"baseline": trainer_at(revision), "current": GRPOTrainer}
    trainers = {
        name: kind(
            load_model(cfg["model"], "float32")[0],
            algo,
            1.0,
            cfg["max_new_tokens"],
            compute_dtype=resolve_dtype(cfg["dtype"]),
            pad_token_id=tok.pad_token_id,
        )
        for name, kind in kinds.items()
    }
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(repeats + 1):
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            trainer.step(groups, 0)
            times[name].append(time.perf_counter() - t0)
            print(f"  {name} step {times[name][-1]:.2f}s", flush=True)
    median = {name: statistics.median(t[1:]) for name, t in times.items()}
    return {
        "revision": revision,
        "dtype": cfg["dtype"],
        "tokens": sum(len(s.tokens) for g in groups for s in g.samples),
        "sequences": sum(len(g.samples) for g in groups),
        "torch_threads": torch.get_num_threads(),
        "seconds": times,
        "median_s": median,
        "speedup": median["baseline"] / median["current"],
    }


def report_step_speed(args: argparse.Namespace) -> None:
    """--step-speed: time each preset's step against the revision; print a table, write JSON."""
    speed = {
        name: step_speed(
            {
                **RUNS[name],
                "prompts": args.prompts or RUNS[name]["prompts"],
                "dtype": args.dtype or RUNS[name]["dtype"],
            },
            args.step_speed,
            args.repeats,
        )
        for name in args.preset or ["tiny", "smollm2"]
    }
    print(
        "| run | dtype | sequences, completion tokens | before s/step | after s/step | speed-up |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, r in speed.items():
        print(
            f"| {name} | {r['dtype']} | {r['sequences']}, {r['tokens']} "
            f"| {r['median_s']['baseline']:.2f} "
            f"| {r['median_s']['current']:.2f} | {r['speedup']:.2f}x |"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"step_speed_{'_'.join(speed)}.json"
    out.write_text(json.dumps(speed, indent=2))
    print(f"wrote {out}")


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
    ap.add_argument("--step-speed", metavar="REV", help="time steps against grpo.py at REV")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps each (--step-speed)")
    ap.add_argument("--prompts", type=int, help="override the batch's prompts (--step-speed)")
    ap.add_argument("--dtype", help="override the compute dtype (--step-speed)")
    args = ap.parse_args()
    if args.step_speed:
        report_step_speed(args)
        return
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
