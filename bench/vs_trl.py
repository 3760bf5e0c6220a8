"""swarmrl's bare GRPO loop against TRL's GRPOTrainer: same model, task and settings, same wall
time, one scoring harness.

Both start from the same weights and train on the same task's prompts with the same group size,
batch (prompts x group samples per optimizer step, micro-batches of 16), learning rate, length
cap, loss (DAPO normalisation, clip 0.2 / 0.28, two-sided cap 4, no KL, group-std advantages),
sampling temperature and precision, neither recomputing activations, each for the same number
of wall-clock minutes. The final models are scored by one function
(`trainer.local.greedy_accuracy`: greedy accuracy on the held-out split).
End-to-end tokens/s = completion tokens sampled / wall time of the training loop (generation,
rewards and optimizer steps; model loading and evaluation excluded).

The third side, `swarm`, is the simulated swarm (`examples/swarm.py`) on the same settings:
honest nodes generate, the coordinator validates every rollout (TOPLOC, sampling replay,
logprobs) and trains, all as processes on this machine. Its loop runs from the first lease to
the last submission received and counts only tokens the coordinator verified.

    pip install -e '.[bench]'                 # TRL
    python bench/vs_trl.py --quick --threads 1   # tiny preset, 3 minutes each: ~13 minutes
    python bench/vs_trl.py --quick --sides swarmrl,trl   # without the swarm: under 10 minutes
    python bench/vs_trl.py                    # SmolLM2-135M on 2-digit addition, 10 min each
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/protocol.py shadows protocol

import torch

from toploc.models import load_model
from trainer.local import greedy_accuracy, local_algorithm, train_locally
from trainer.presets import local_config
from trainer.rewards import score
from trainer.tasks import Task, make_task

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
SWARM_NODES = 2


def trl_run(cfg: dict[str, Any], seconds: float, eval_limit: int, seed: int) -> dict[str, Any]:
    """TRL's GRPOTrainer on `cfg` for `seconds` of training; its numbers and final accuracy."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model, tok = load_model(cfg["model"], "float32")
    task = make_task(cfg["task"], seed, cfg["options"])
    rows = [{"prompt": task.render(e, tok), **e.columns} for e in task.train]
    sampled = {"tokens": 0, "completions": 0, "reward_sum": 0.0}
    algo = local_algorithm(cfg)
    batch = cfg["prompts"] * cfg["group"]

    def reward(prompts, completions, completion_ids, **columns):
        # TRL passes the rendered prompt; swarmrl's rewards take the question, which the
        # task's reference columns already pin down, so the rendered text serves.
        columns = {k: v for k, v in columns.items() if k in rows[0]}
        totals, _ = score(task.rewards, prompts, completions, columns)
        sampled["tokens"] += sum(len(ids) for ids in completion_ids)
        sampled["completions"] += len(completions)
        sampled["reward_sum"] += sum(totals)
        return totals

    class WallClock(TrainerCallback):
        """Stops training once the budget is spent, as `train_locally`'s loop does."""

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - start >= seconds:
                control.should_training_stop = True
            return control

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="vs_trl_"),
        use_cpu=True,
        bf16=cfg["dtype"] == "bfloat16",
        seed=seed,
        max_steps=10**6,
        per_device_train_batch_size=algo.micro_batch,
        gradient_accumulation_steps=batch // algo.micro_batch,
        num_generations=cfg["group"],
        max_completion_length=cfg["max_new_tokens"],
        temperature=1.0,
        learning_rate=cfg["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=algo.weight_decay,
        max_grad_norm=algo.grad_clip,
        beta=algo.beta,
        loss_type=algo.loss_type,
        epsilon=algo.epsilon_low,
        epsilon_high=algo.epsilon_high,
        delta=algo.delta,
        scale_rewards=algo.scale_rewards,
        mask_truncated_completions=algo.mask_truncated,
        # TRL turns activation checkpointing on by default; swarmrl's trainer does not
        # recompute, so off, both sides do the same work per step.
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[WallClock()],
    )
    start = time.perf_counter()
    trainer.train()
    loop_s = time.perf_counter() - start
    trained = trainer.model.eval()
    return {
        "steps": trainer.state.global_step,
        "loop_s": loop_s,
        "sampled_tokens": sampled["tokens"],
        "mean_train_reward": sampled["reward_sum"] / max(sampled["completions"], 1),
        "accuracy_after": greedy_accuracy(trained, tok, task, cfg, eval_limit)["accuracy"],
    }


def swarmrl_run(cfg: dict[str, Any], seconds: float, eval_limit: int, seed: int) -> dict[str, Any]:
    """The bare loop (`trainer.local`) for `seconds`; it scores with the same harness."""
    r = train_locally({**cfg, "minutes": seconds / 60}, seed, eval_limit, progress=False)
    rewards = [p["reward"] for p in r["curve"]]
    return {
        "steps": r["steps"],
        "loop_s": r["loop_s"],
        "generation_s": r["generation_s"],
        "train_s": r["train_s"],
        "sampled_tokens": r["sampled_tokens"],
        "mean_train_reward": sum(rewards) / max(len(rewards), 1),
        "accuracy_before": r["accuracy_before"],
        "accuracy_after": r["accuracy_after"],
    }


def swarm_run(cfg: dict[str, Any], seconds: float, eval_limit: int, seed: int) -> dict[str, Any]:
    """The simulated swarm (`examples/swarm.py`: a coordinator that validates every rollout with
    every check on, honest nodes, no relay, no cheaters) with `seconds` of wall time from the
    coordinator being up; its newest published version scored with the same harness.

    Its loop time runs from the first lease to the last submission received, its tokens are
    the ones the coordinator verified (work still in flight at the end is not counted)."""
    import sqlite3
    import subprocess

    work = Path(tempfile.mkdtemp(prefix="vs_trl_swarm_"))
    options = ", ".join(f"{k} = {json.dumps(v)}" for k, v in cfg["options"].items())
    settings = {
        "seed": seed,
        "task.options": f"{{ {options} }}",
        "algorithm.lr": cfg["lr"],
        "algorithm.batch_prompts": cfg["prompts"],
        "sampling.group_size": cfg["group"],
        # every group the size TRL samples (the demo's profile grows flat prompts' groups)
        "sampling.max_group_size": 0,
        # the pool's default window, as measured in docs/learning.md (the tiny profile's is 3)
        "limits.max_staleness": 2,
        "sampling.max_new_tokens": cfg["max_new_tokens"],
        "model.dtype": cfg["dtype"],
    }
    cmd = [
        sys.executable, str(ROOT / "examples" / "swarm.py"),
        "--model", cfg["model"], "--task", cfg["task"],
        "--nodes", str(SWARM_NODES), "--relays", "0", "--byzantine", "none",
        "--steps", "1000000", "--train-s", str(seconds), "--timeout", str(seconds + 600),
        "--workdir", str(work), "--report", str(work / "report.json"), "--progress-s", "60",
    ]  # fmt: skip
    for key, value in settings.items():
        cmd += ["--set", f"{key}={value}"]
    subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 900)
    report = json.loads((work / "report.json").read_text())
    db = sqlite3.connect(work / "coordinator" / "ledger.sqlite")
    first_lease = db.execute("SELECT MIN(issued_at) FROM leases").fetchone()[0]
    last_answer = db.execute("SELECT MAX(received_at) FROM submissions").fetchone()[0]
    tokens = db.execute("SELECT SUM(verified_tokens) FROM nodes").fetchone()[0] or 0
    rewards = [r for (row,) in db.execute("SELECT rewards FROM groups") for r in json.loads(row)]
    db.close()
    newest = max((work / "coordinator" / "weights").iterdir())
    model, tok = load_model(str(newest), "float32")
    task = make_task(cfg["task"], seed, cfg["options"])
    return {
        "steps": report["steps"],
        "loop_s": last_answer - first_lease,
        "sampled_tokens": tokens,
        "mean_train_reward": sum(rewards) / max(len(rewards), 1),
        "nodes": SWARM_NODES,
        "wasted_share": report["waste"]["share"],
        "startup_s": report["startup_s"],
        "accuracy_after": greedy_accuracy(model.eval(), tok, task, cfg, eval_limit)["accuracy"],
    }


def untrained_accuracy(cfg: dict[str, Any], eval_limit: int, seed: int) -> float:
    model, tok = load_model(cfg["model"], "float32")
    task: Task = make_task(cfg["task"], seed, cfg["options"])
    return greedy_accuracy(model.eval(), tok, task, cfg, eval_limit)["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="tiny preset, 3 minutes each")
    ap.add_argument("--minutes", type=float, help="training wall time of each side")
    ap.add_argument("--eval-limit", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch threads for both sides (default: torch's)")
    ap.add_argument("--json", type=Path, help="write the results here (default: results/)")
    ap.add_argument(
        "--sides",
        default="swarmrl,trl,swarm",
        help="which to run, comma-separated: swarmrl (the bare loop), trl, swarm (the "
        "simulated swarm with every check on; its processes take one torch thread each)",
    )
    args = ap.parse_args()
    if args.threads:
        # On a shared machine a second thread on small matrices mostly waits for the first.
        torch.set_num_threads(args.threads)
    preset = "tiny" if args.quick else "smollm2-135m"
    minutes = args.minutes or (3.0 if args.quick else 10.0)
    cfg = local_config(preset)
    load = os.getloadavg()
    print(f"{preset}: {cfg['model']} on {cfg['task']} {cfg['options']}, {minutes} min each")
    print(f"load average before: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", flush=True)
    before = untrained_accuracy(cfg, args.eval_limit, args.seed)
    sides = {}
    runs = {"swarmrl": swarmrl_run, "trl": trl_run, "swarm": swarm_run}
    for name in args.sides.split(","):
        run = runs[name.strip()]
        torch.manual_seed(args.seed)
        sides[name] = run(cfg, minutes * 60, args.eval_limit, args.seed)
        sides[name]["tokens_per_s"] = sides[name]["sampled_tokens"] / sides[name]["loop_s"]
        print(f"  {name}: {json.dumps(sides[name])}", flush=True)
    ratios = {
        name: s["tokens_per_s"] / sides["trl"]["tokens_per_s"]
        for name, s in sides.items()
        if name != "trl" and "trl" in sides
    }
    print()
    print("| side | steps | loop s | sampled tokens | tokens/s | train reward | accuracy |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, s in sides.items():
        print(
            f"| {name} | {s['steps']} | {s['loop_s']:.0f} | {s['sampled_tokens']} "
            f"| {s['tokens_per_s']:.0f} | {s['mean_train_reward']:.3f} "
            f"| {before:.0%} -> {s['accuracy_after']:.0%} |"
        )
    for name, ratio in ratios.items():
        print(f"{name} / TRL end-to-end tokens/s: {ratio:.2f}x")
    result = {
        "preset": preset,
        "config": cfg,
        "minutes": minutes,
        "load_average_before": load,
        "load_average_after": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
        "accuracy_before": before,
        "sides": sides,
        "tokens_per_s_ratio": ratios.get("swarmrl"),
        "tokens_per_s_ratios": ratios,
    }
    out = args.json or RESULTS / f"vs_trl_{preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
