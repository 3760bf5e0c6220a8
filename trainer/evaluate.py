"""Reproducible accuracy: greedy decoding of a task's held-out split with its fixed prompt.

A completion counts as correct when it earns the task's full reward (the sum of its reward
weights): for the built-in tasks, an exact answer. One answer extractor per task, no sampling,
so two runs on the same weights give the same number.
"""

from __future__ import annotations

from typing import Any

from tqdm import tqdm
from transformers import PreTrainedModel

from toploc import capture_hf
from toploc.models import eos_token_ids
from toploc.sampling import SamplingParams
from trainer.rewards import score
from trainer.tasks import Task


def evaluate(
    model: PreTrainedModel,
    tokenizer: Any,
    task: Task,
    split: str = "test",
    limit: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    examples = {"test": task.test, "train": task.train}[split][:limit]
    if not examples:
        raise ValueError(f"task {task.name!r} has no {split} examples")
    params = SamplingParams(
        temperature=0.0,
        max_tokens=max_new_tokens,
        eos_token_ids=tuple(eos_token_ids(model, tokenizer)),
    )
    full = sum(r.weight for r in task.rewards)
    correct, rewards, shown = 0, [], []
    bar = tqdm(
        total=len(examples), desc=f"eval {task.name}/{split}", disable=not progress, unit="prompt"
    )
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        prompts = [
            tokenizer(task.render(e, tokenizer), add_special_tokens=False)["input_ids"]
            for e in batch
        ]
        rollouts = capture_hf.generate(
            model,
            prompts,
            params,
            seeds=[0] * len(batch),
            pad_token_id=tokenizer.pad_token_id,
            capture=False,
        )
        texts = [tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in rollouts]
        for example, text in zip(batch, texts, strict=True):
            total, _ = score(
                task.rewards, [example.prompt], [text], {k: [v] for k, v in example.columns.items()}
            )
            rewards.append(total[0])
            correct += total[0] >= full - 1e-9
            if len(shown) < 5:
                shown.append(
                    {
                        "prompt": example.prompt,
                        "completion": text,
                        **example.columns,
                        "reward": total[0],
                    }
                )
        bar.update(len(batch))
    bar.close()
    return {
        "task": task.name,
        "split": split,
        "n": len(examples),
        "accuracy": correct / len(examples),
        "mean_reward": sum(rewards) / len(rewards),
        "max_new_tokens": max_new_tokens,
        "examples": shown,
    }
