"""What `coordinator init` decides before it writes a pool file, and the checks that let it
refuse at once (a model or dataset that is missing, unreadable or unsupported) rather than at
`coordinator run` or at a node's first lease.

Everything detected (the pinned model revision, the dataset's columns and eval split, the
reward chosen from the answers) is written into the pool spec explicitly, so the pool id pins
it and a later change of a default cannot change a pool under its nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from protocol.config import apply_overrides
from protocol.errors import SwarmError
from protocol.poolspec import PoolSpec
from trainer.presets import CHAT_TASKS, MAX_NEW_TOKENS, PRESETS
from trainer.rewards import BUILTIN
from trainer.sizing import defaults_for
from trainer.tasks import Task, pool_task

DEFAULT_TASK = "arithmetic"
"""A task for a model that is not a preset when neither --task nor --dataset is given: it needs
no data and shows within minutes whether the pool learns."""


@dataclass
class InitRequest:
    model: str
    task: str | None = None
    dataset: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    """split, eval_split, prompt_column, answer_column, as given on the command line."""
    limit: int | None = None
    rewards: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    """Task options as KEY=VALUE."""


def plan(req: InitRequest) -> tuple[dict[str, Any], list[str]]:
    """The pool tables for the model and task (before the coordinator section and --set), and
    lines telling the user what was chosen and why."""
    lines: list[str] = []
    if req.model in PRESETS:
        tree: dict[str, Any] = msgspec.to_builtins(PRESETS[req.model])
        tree = apply_overrides(tree, [f"model.name={req.model}"])
        chat = True  # both presets have a chat template
        lines.append(f"model {req.model}: a preset, with its measured settings (RL.md)")
    else:
        from toploc.modelinfo import inspect_model

        info = inspect_model(req.model)
        chat = info.chat_template
        size, tree = defaults_for(info.parameters)
        tree["model"]["name"] = info.name
        algo = tree["algorithm"]
        lines += [
            f"model {info.name}: {info.architecture}, {info.parameters / 1e6:,.1f}M parameters, "
            + ("chat template" if chat else "no chat template: plain-text prompts"),
            f"  size class {size.name}: lr {algo['lr']:g}, batch_prompts {algo['batch_prompts']}, "
            f"micro_batch {algo['micro_batch']}, group_size {size.group_size}, dtype {size.dtype} "
            "(docs/models-and-data.md; change any with --set)",
        ]
    name = _task_name(req, tree)
    options: dict[str, Any] = {}
    if name != tree.get("task", {}).get("name"):
        if name in CHAT_TASKS:
            options["chat"] = chat
        tree.setdefault("sampling", {})["max_new_tokens"] = MAX_NEW_TOKENS.get(name, 32)
    else:
        options = dict(tree["task"].get("options", {}))
    if req.dataset:
        key = "path" if name == "gsm8k" else "source"
        # A local dataset by absolute path: `coordinator run` may start in another folder.
        local = Path(req.dataset).expanduser()
        options[key] = str(local.resolve()) if local.exists() else req.dataset
        options.update({k: v for k, v in req.dataset_options.items() if v})
    options = apply_overrides(options, req.options)
    tree["task"] = {"name": name, "options": options, "limit": req.limit, "rewards": req.rewards}
    return tree, lines


def _task_name(req: InitRequest, tree: dict[str, Any]) -> str:
    if req.task:
        return req.task
    if req.dataset:
        return "dataset"
    return tree.get("task", {}).get("name") or DEFAULT_TASK


def check_task(spec: PoolSpec) -> tuple[dict[str, Any], list[str]]:
    """Build the task exactly as `coordinator run` will and render prompts with the model's
    tokenizer. Returns the task table with everything detected made explicit, and report
    lines. Raises SwarmError naming what is wrong."""
    from transformers import AutoTokenizer

    from toploc.models import model_dir

    task = _build(spec)
    tokenizer = AutoTokenizer.from_pretrained(model_dir(spec.model.name))
    sample = task.train[: min(len(task.train), 256)]
    lengths = [
        len(tokenizer(task.render(e, tokenizer), add_special_tokens=False)["input_ids"])
        for e in sample
    ]
    table = msgspec.to_builtins(spec.task)
    if spec.task.name == "dataset":
        table["options"] = {k: v for k, v in task.options.items() if v != ""}
    if not spec.task.rewards:
        table["rewards"] = [_reward_name(r.func) for r in task.rewards]
    lines = [
        f"task {spec.task.name}: {len(task.train)} training prompts, {len(task.test)} held out; "
        f"rewards {', '.join(table['rewards'] or [r.name for r in task.rewards])}",
        f"  prompt tokens (first {len(sample)}): max {max(lengths)}, completions up to "
        f"{spec.sampling.max_new_tokens}",
    ]
    if spec.task.name == "dataset":
        o = task.options
        lines.append(
            f"  columns: prompt {o['prompt_column']!r}, answer {o['answer_column'] or '(none)'!r}"
            f"; eval split {o['eval_split']!r}"
        )
    return table, lines


def _build(spec: PoolSpec) -> Task:
    try:
        return pool_task(spec)
    except SwarmError as e:
        if "path" in str(e) and spec.task.name == "gsm8k":
            raise SwarmError("task gsm8k reads a dataset: give it with --dataset") from None
        raise


def _reward_name(func: Any) -> str:
    """A built-in's registered name (what the spec's `rewards` list takes)."""
    for name, f in BUILTIN.items():
        if f is func:
            return name
    raise SwarmError(f"the task's reward {func!r} has no name a pool spec can record")
