"""Multi-turn learning with every check on: the number-guessing game on the tiny model.

    python bench/multiturn_learning.py --minutes 4

Each step is an offline lease of `--prompts` games x `--group` samples with fresh seeds, played
by the node's turn loop (seeded turns, TOPLOC proofs built), judged by the coordinator's
`Validator` (environment replay, TOPLOC, sampler replay, logprobs, then rewards), and trained by
the coordinator's `GRPOTrainer` on the accepted groups with environment tokens out of the loss
(`trainer.environments.turns`). Writes bench/results/multiturn_learning.json and
docs/multiturn_learning.png.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/protocol.py shadows protocol

import torch

from node.engine import HFEngine, offline_lease
from node.multiturn import generate_turns
from protocol import messages as msg
from protocol import poolspec
from toploc.models import build_tiny, eos_token_ids, load_model
from toploc.sampling import SamplingParams
from trainer.algorithm import GroupAlgorithm
from trainer.config import AlgorithmSection
from trainer.environments.turns import transcript_sample
from trainer.grpo import GRPOTrainer, TrainGroup
from trainer.tasks import make_task
from trainer.validator import LeaseView, Validator

ROOT = Path(__file__).resolve().parents[1]
GAME_CHARS = "0123456789+-= :egsu"
"""Every character of the prompt "guess 0-9:" and of the replies ("+", "-", "=7")."""


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    # The small vocabulary (what the game's text needs) lets a random model find digits at all.
    model, tok = build_tiny(args.seed, GAME_CHARS) if args.small_vocab else load_model("tiny")
    task = make_task("guess", args.seed, {"max_turns": args.max_turns, "feedback": args.feedback})
    eos = eos_token_ids(model, tok)
    params = SamplingParams(
        temperature=1.0, max_tokens=args.max_new_tokens, eos_token_ids=tuple(eos)
    )
    spec = poolspec.from_dict(
        {"name": "bench", "coordinator": {"public_key": "ab" * 32}, "task": {"name": "guess"}}
    )
    validator = Validator(spec, task, tok, lambda v: model, len(tok), tok.pad_token_id)
    algo = AlgorithmSection(lr=args.lr, batch_prompts=args.prompts, micro_batch=128, is_cap=0.0)
    trainer = GRPOTrainer(model, algo, 1.0, args.max_new_tokens, pad_token_id=tok.pad_token_id)
    algorithm = GroupAlgorithm(algo.scale_rewards)
    engine = HFEngine()
    engine.model, engine.pad_token_id, engine.version = model, tok.pad_token_id, 0
    prompt = tok(task.render(task.train[0], tok), add_special_tokens=False)["input_ids"]

    curve, t0, step = [], time.perf_counter(), 0
    seconds = {"generate": 0.0, "validate": 0.0, "train": 0.0}
    while time.perf_counter() - t0 < args.minutes * 60:
        lease = offline_lease(
            [prompt] * args.prompts,
            group_size=args.group,
            max_new_tokens=args.max_new_tokens,
            eos_token_ids=eos,
            first_seed=rng.getrandbits(40),
        )
        model.eval()
        t = time.perf_counter()
        sub = msg.Submission(
            lease_id=1,
            weight_version=step,
            results=generate_turns(engine, task.environment, tok, lease),
        )
        seconds["generate"] += time.perf_counter() - t
        t = time.perf_counter()
        verdict = validator.validate(sub, LeaseView.of(lease, params), step)
        seconds["validate"] += time.perf_counter() - t
        if verdict.outcome != "accept":
            raise SystemExit(f"an honest lease was refused: {verdict}")
        batch = []
        for g in verdict.groups:
            scored = algorithm.score(g.rewards)
            if scored.dropped is not None:
                continue
            p = g.payload
            samples = [
                transcript_sample(p.prompt_ids, tokens, lp, segs, tr)
                for tokens, lp, segs, tr in zip(
                    p.tokens, p.logprobs, p.segments, p.truncated, strict=True
                )
            ]
            batch.append(TrainGroup(samples, g.rewards, scored.advantages, step))
        t = time.perf_counter()
        if batch:
            trainer.step(batch, step)
        seconds["train"] += time.perf_counter() - t
        step += 1
        rewards = [r for g in verdict.groups for r in g.rewards]
        turns = [len(c.segments) // 2 + 1 for r in sub.results for c in r.completions]
        curve.append(
            {
                "step": step,
                "time_s": round(time.perf_counter() - t0, 2),
                "reward": sum(rewards) / len(rewards),
                "found": sum(r > 0 for r in rewards) / len(rewards),
                "turns": sum(turns) / len(turns),
            }
        )
        if step % 5 == 0:
            c = curve[-1]
            print(
                f"step {step:4d} {c['time_s']:6.0f}s reward {c['reward']:.3f} "
                f"found {c['found']:.2f} turns {c['turns']:.2f}",
                flush=True,
            )
    tenth = max(1, len(curve) // 10)
    return {
        "settings": vars(args),
        "steps": step,
        "seconds": seconds,
        "reward_first_10pct": sum(c["reward"] for c in curve[:tenth]) / tenth,
        "reward_last_10pct": sum(c["reward"] for c in curve[-tenth:]) / tenth,
        "found_first_10pct": sum(c["found"] for c in curve[:tenth]) / tenth,
        "found_last_10pct": sum(c["found"] for c in curve[-tenth:]) / tenth,
        "curve": curve,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result["curve"]
    minutes = [c["time_s"] / 60 for c in curve]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("reward", "mean reward"), ("found", "games won")):
        ax.plot(minutes, [c[key] for c in curve], label=label)
    ax.set_xlabel("minutes (2 shared CPU cores)")
    ax.set_ylim(0, 1.05)
    s = result["settings"]
    vocab = "game-character vocabulary" if s["small_vocab"] else "tiny preset"
    ax.set_title(
        f"guess 0-9 ({s['feedback']}) in <= {s['max_turns']} turns, {vocab}, every check on"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--feedback", default="direction", choices=["direction", "reveal"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--small-vocab",
        action="store_true",
        help="a tiny model with only the game's characters (default: the tiny preset's 58)",
    )
    args = p.parse_args()
    result = run(args)
    name = f"multiturn_learning_{args.feedback}"
    (ROOT / f"bench/results/{name}.json").write_text(json.dumps(result, indent=1))
    plot(result, ROOT / f"docs/{name}.png")
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=1))


if __name__ == "__main__":
    main()
