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
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/protocol.py shadows protocol

from protocol.poolspec import AlgorithmSection
from toploc.capture_hf import generate
from toploc.models import eos_token_ids, load_model, resolve_dtype
from toploc.sampling import SamplingParams
from trainer.evaluate import evaluate
from trainer.grpo import GRPOTrainer, Sample, TrainGroup
from trainer.rewards import score
from trainer.tasks import make_task

RESULTS = Path(__file__).parent / "results"

PRESETS = {
    "tiny": dict(
        model="tiny",
        dtype="float32",
        task="copy",
        options={"digits": 2},
        lr=2e-3,
        prompts=16,
        group=8,
        max_new_tokens=4,
        minutes=4.0,
    ),
    "smollm2": dict(
        model="smollm2-135m",
        dtype="bfloat16",
        task="arithmetic",
        options={"op": "+", "digits": 2},
        lr=1e-5,
        prompts=8,
        group=8,
        max_new_tokens=16,
        minutes=6.0,
    ),
}


def run(cfg: dict, seed: int = 0, eval_limit: int = 100, progress: bool = True) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, tok = load_model(cfg["model"], "float32")
    task = make_task(cfg["task"], seed, cfg["options"])
    eos = tuple(eos_token_ids(model, tok))
    params = SamplingParams(temperature=1.0, max_tokens=cfg["max_new_tokens"], eos_token_ids=eos)
    dtype = resolve_dtype(cfg["dtype"])
    before = evaluate(
        model.to(dtype),
        tok,
        task,
        limit=eval_limit,
        max_new_tokens=cfg["max_new_tokens"],
        progress=False,
    )
    algo = AlgorithmSection(lr=cfg["lr"], batch_prompts=cfg["prompts"], micro_batch=16, is_cap=0.0)
    trainer = GRPOTrainer(
        model, algo, 1.0, cfg["max_new_tokens"], compute_dtype=dtype, pad_token_id=tok.pad_token_id
    )
    curve, t0, step = [], time.perf_counter(), 0
    gen_s = train_s = 0.0
    train_tokens = 0
    while time.perf_counter() - t0 < cfg["minutes"] * 60:
        examples = rng.sample(task.train, cfg["prompts"])
        prompts = [
            tok(task.render(e, tok), add_special_tokens=False)["input_ids"] for e in examples
        ]
        g = cfg["group"]
        # Generation runs on the weights nodes would hold: the pool dtype.
        model.eval()
        tg = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            rollouts = generate(
                model,
                [p for p in prompts for _ in range(g)],
                params,
                [rng.getrandbits(62) for _ in range(len(prompts) * g)],
                sample_indices=[i % g for i in range(len(prompts) * g)],
                pad_token_id=tok.pad_token_id,
                capture=False,
            )
        gen_s += time.perf_counter() - tg
        groups = []
        for i, e in enumerate(examples):
            rs = rollouts[i * g : (i + 1) * g]
            texts = [tok.decode(r.completion_ids, skip_special_tokens=True) for r in rs]
            totals, _ = score(
                task.rewards, [e.prompt] * g, texts, {k: [v] * g for k, v in e.columns.items()}
            )
            samples = [
                Sample(r.prompt_ids, r.completion_ids, r.logprobs, r.finish_reason == "length")
                for r in rs
            ]
            groups.append(TrainGroup(samples, totals, step, i))
        result = trainer.step(groups, step)
        step += 1
        train_s += result.metrics["step_time_s"]
        train_tokens += int(result.metrics["tokens"])
        point = {
            "step": step,
            "time_s": time.perf_counter() - t0,
            "reward": result.metrics["reward_mean"],
            "frac_zero_std": result.metrics["frac_reward_zero_std"],
        }
        curve.append(point)
        if progress and step % 5 == 0:
            print(
                f"  step {step:4d}  {point['time_s']:6.0f}s  reward {point['reward']:.3f}",
                flush=True,
            )
    model.eval()
    after = evaluate(
        model.to(dtype),
        tok,
        task,
        limit=eval_limit,
        max_new_tokens=cfg["max_new_tokens"],
        progress=False,
    )
    first = curve[: max(1, len(curve) // 10)]
    last = curve[-max(1, len(curve) // 10) :]
    return {
        **{k: v for k, v in cfg.items()},
        "steps": step,
        "seconds": time.perf_counter() - t0,
        "reward_first_10pct": sum(p["reward"] for p in first) / len(first),
        "reward_last_10pct": sum(p["reward"] for p in last) / len(last),
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "mean_reward_eval_before": before["mean_reward"],
        "mean_reward_eval_after": after["mean_reward"],
        "seconds_per_step": (time.perf_counter() - t0) / max(step, 1),
        "generation_s": gen_s,
        "train_s": train_s,
        "trainer_tokens_per_s": train_tokens / train_s if train_s else 0.0,
        "curve": curve,
        "examples_after": after["examples"][:3],
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
        choices=sorted(PRESETS),
        help="which run(s) (default: tiny and smollm2)",
    )
    ap.add_argument("--minutes", type=float, help="override each run's time budget")
    ap.add_argument("--eval-limit", type=int, default=100)
    args = ap.parse_args()
    results = {}
    for name in args.preset or ["tiny", "smollm2"]:
        cfg = dict(PRESETS[name])
        if args.minutes:
            cfg["minutes"] = args.minutes
        print(
            f"{name}: {cfg['model']} on {cfg['task']} {cfg['options']} for {cfg['minutes']} min",
            flush=True,
        )
        results[name] = run(cfg, eval_limit=args.eval_limit)
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
