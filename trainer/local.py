"""Training without the network: the bare on-policy GRPO loop in one process.

Seeded generation with the node's sampler, rewards computed as the coordinator does, and the
coordinator's `GRPOTrainer`. It is the baseline the swarm should approach, the learning test's
loop, and a quick way to check that a task and settings learn before launching a pool.
"""

from __future__ import annotations

import copy
import random
import time
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from toploc.capture_hf import generate
from toploc.models import eos_token_ids, load_model, resolve_dtype
from toploc.sampling import SamplingParams
from trainer.algorithm import GroupAlgorithm
from trainer.config import AlgorithmSection
from trainer.evaluate import evaluate
from trainer.grpo import GRPOTrainer, Sample, TrainGroup
from trainer.rewards import score
from trainer.tasks import Example, Task, make_task


def train_locally(
    cfg: dict[str, Any], seed: int = 0, eval_limit: int = 100, progress: bool = True
) -> dict[str, Any]:
    """Train `cfg` (model, dtype, task, options, lr, prompts, group, max_new_tokens, and a
    budget: `minutes` and/or `steps`); returns the curve, accuracy before and after, and
    timings."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, tok = load_model(cfg["model"], "float32")
    task = make_task(cfg["task"], seed, cfg["options"])
    eos = tuple(eos_token_ids(model, tok))
    params = SamplingParams(temperature=1.0, max_tokens=cfg["max_new_tokens"], eos_token_ids=eos)
    dtype = resolve_dtype(cfg["dtype"])

    before = greedy_accuracy(model, tok, task, cfg, eval_limit)
    algo = local_algorithm(cfg)
    trainer = GRPOTrainer(
        model, algo, 1.0, cfg["max_new_tokens"], compute_dtype=dtype, pad_token_id=tok.pad_token_id
    )
    algorithm = GroupAlgorithm(algo.scale_rewards)
    policy = pool_copy(model, dtype)
    curve, t0, step = [], time.perf_counter(), 0
    gen_s = train_s = 0.0
    train_tokens = sampled_tokens = 0
    max_steps = cfg.get("steps")
    while time.perf_counter() - t0 < cfg.get("minutes", 1e9) * 60 and (
        max_steps is None or step < max_steps
    ):
        examples = rng.sample(task.train, cfg["prompts"])
        tg = time.perf_counter()
        samples = sample(policy, tok, task, examples, params, rng, cfg["group"])
        gen_s += time.perf_counter() - tg
        sampled_tokens += sum(len(s.tokens) for group in samples for s in group)
        groups, rewards = score_groups(tok, task, examples, samples, step, algorithm)
        if groups:
            result = trainer.step(algorithm.batch(groups), step)
            train_s += result.metrics["step_time_s"]
            train_tokens += int(result.metrics["tokens"])
            refresh_copy(policy, model)
        step += 1
        point = {
            "step": step,
            "time_s": time.perf_counter() - t0,
            "reward": sum(map(sum, rewards)) / sum(map(len, rewards)),
            "frac_zero_std": 1.0 - len(groups) / len(rewards),
        }
        curve.append(point)
        if progress and step % 5 == 0:
            print(
                f"  step {step:4d}  {point['time_s']:6.0f}s  reward {point['reward']:.3f}",
                flush=True,
            )
    loop_s = time.perf_counter() - t0
    model.eval()
    after = greedy_accuracy(model, tok, task, cfg, eval_limit)
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
        "loop_s": loop_s,
        "sampled_tokens": sampled_tokens,
        "curve": curve,
        "examples_after": after["examples"][:3],
    }


def greedy_accuracy(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    task: Task,
    cfg: dict[str, Any],
    eval_limit: int,
) -> dict[str, Any]:
    """`coordinator eval`'s greedy accuracy on the held-out split, on the weights in the pool
    dtype (what nodes would generate with)."""
    return evaluate(
        model.to(resolve_dtype(cfg["dtype"])),
        tok,
        task,
        limit=eval_limit,
        max_new_tokens=cfg["max_new_tokens"],
        progress=False,
    )


def local_algorithm(cfg: dict[str, Any]) -> AlgorithmSection:
    """The bare loop's algorithm settings: on-policy, so no trust band on the ratio."""
    return AlgorithmSection(lr=cfg["lr"], batch_prompts=cfg["prompts"], micro_batch=16, is_cap=0.0)


def pool_copy(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """The weights nodes would generate with: `model` itself in fp32, else a copy in `dtype`
    (`refresh_copy` after each step). Generating from it costs no per-op cast of the fp32
    master weights: under autocast every decoding step cast each weight matrix again."""
    return model if dtype == torch.float32 else copy.deepcopy(model).to(dtype).eval()


@torch.no_grad()
def refresh_copy(policy: PreTrainedModel, model: PreTrainedModel) -> None:
    """Copy `model`'s updated weights into its `pool_copy`, cast to the copy's dtype."""
    if policy is not model:
        for dst, src in zip(policy.parameters(), model.parameters(), strict=True):
            dst.copy_(src)


def sample_groups(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    task: Task,
    examples: list[Example],
    params: SamplingParams,
    rng: random.Random,
    group: int,
    version: int,
    algorithm: GroupAlgorithm,
) -> tuple[list[TrainGroup], list[list[float]]]:
    """`group` seeded samples of each example from `model` (in the pool dtype), scored as the
    coordinator scores them: the groups that train (tagged with weight `version`) and every
    group's rewards."""
    samples = sample(model, tok, task, examples, params, rng, group)
    return score_groups(tok, task, examples, samples, version, algorithm)


def sample(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    task: Task,
    examples: list[Example],
    params: SamplingParams,
    rng: random.Random,
    group: int,
) -> list[list[Sample]]:
    """`group` seeded samples of each example, generated as a node would: from `model` as it
    is, in the pool dtype (`pool_copy`)."""
    prompts = [tok(task.render(e, tok), add_special_tokens=False)["input_ids"] for e in examples]
    model.eval()
    rollouts = generate(
        model,
        [p for p in prompts for _ in range(group)],
        params,
        [rng.getrandbits(62) for _ in range(len(prompts) * group)],
        sample_indices=[i % group for i in range(len(prompts) * group)],
        pad_token_id=tok.pad_token_id,
        capture=False,
    )
    return [
        [
            Sample(r.prompt_ids, r.completion_ids, r.logprobs, r.finish_reason == "length")
            for r in rollouts[i * group : (i + 1) * group]
        ]
        for i in range(len(examples))
    ]


def score_groups(
    tok: PreTrainedTokenizerBase,
    task: Task,
    examples: list[Example],
    samples: list[list[Sample]],
    version: int,
    algorithm: GroupAlgorithm,
) -> tuple[list[TrainGroup], list[list[float]]]:
    """Rewards of each example's samples, as the coordinator computes them: the groups that
    train (tagged with weight `version`) and every group's rewards."""
    groups, rewards = [], []
    for i, (e, group) in enumerate(zip(examples, samples, strict=True)):
        texts = [tok.decode(s.tokens, skip_special_tokens=True) for s in group]
        n = len(group)
        columns = {k: [v] * n for k, v in e.columns.items()}
        totals, _ = score(task.rewards, [e.prompt] * n, texts, columns)
        rewards.append(totals)
        scored = algorithm.score(totals)
        if scored.dropped is None:
            groups.append(TrainGroup(group, totals, scored.advantages, version, i))
    return groups, rewards
