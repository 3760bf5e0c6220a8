"""A `verifiers` taskset as a swarmrl task: its tasks' prompts, its rewards on the coordinator.

    [task]
    name = "verifiers"
    options = { taskset = "my-taskset" }   # an installed verifiers (>= 0.4) taskset package

verifiers 0.4 (`verifiers.v1`) describes an environment as a taskset (config in, typed tasks
out) whose tasks score a finished rollout with their `@vf.reward` methods (and plugged reward
functions), recorded on a `Trace`. Here the taskset's tasks become prompts, and each completion
is scored by the task's own `score()` on a trace that holds the prompt and the completion as one
sampled assistant message. Rewards that need a runtime (a container the rollout ran in) have no
runtime here and are skipped, as `verifiers` itself skips them when scoring offline; a taskset
whose reward lies only there scores nothing, and the task refuses it up front.

Only single-turn use: a verifiers agent's tool calls run through harnesses and tool servers,
which are neither deterministic nor cheap enough for the coordinator to replay.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from protocol.errors import SwarmError
from trainer.rewards import WeightedReward
from trainer.tasks import Example, Task

MAX_TASKS = 100_000
"""Tasks read from a taskset (some are endless generators)."""


class VerifiersError(SwarmError):
    """The verifiers package or the named taskset cannot be used."""


def _vf() -> Any:
    try:
        import verifiers.v1 as vf
    except ImportError:
        raise VerifiersError(
            'task "verifiers" needs the verifiers package: pip install "verifiers>=0.4,<0.5"'
        ) from None
    return vf


def load_tasks(taskset: str, limit: int = MAX_TASKS) -> list[Any]:
    """The first `limit` tasks of the installed taskset `taskset`."""
    _vf()
    from verifiers.v1.utils.loaders import taskset_class, taskset_config_type

    try:
        cls = taskset_class(taskset)
        config = taskset_config_type(taskset)(id=taskset)
    except (ModuleNotFoundError, TypeError, AttributeError, ValueError) as e:
        raise VerifiersError(f"verifiers taskset {taskset!r} cannot be loaded: {e}") from None
    return list(itertools.islice(iter(cls(config)), min(limit, MAX_TASKS)))


class TasksetReward:
    """A TRL-style reward function that scores each completion with its task's own rewards
    (their weighted sum, as `verifiers` totals them)."""

    __name__ = "verifiers"

    def __init__(self, tasks: list[Any]) -> None:
        self.tasks = tasks

    def __call__(
        self, prompts: list[str], completions: list[str], vf_index: list[int], **_: Any
    ) -> list[float | None]:
        return [
            self.score(self.tasks[i], text) for i, text in zip(vf_index, completions, strict=True)
        ]

    def score(self, task: Any, completion: str) -> float | None:
        """The task's reward for `completion`, or None when none of its rewards ran."""
        trace = rollout_trace(task, completion)
        asyncio.run(task.score(trace))
        ran = [r for r in trace.rewards.values() if r is not None]
        return trace.reward if ran else None


def rollout_trace(task: Any, completion: str) -> Any:
    """A trace of `task` answered by `completion` in one sampled assistant turn."""
    vf = _vf()
    from verifiers.v1.graph import MessageNode
    from verifiers.v1.state import state_cls
    from verifiers.v1.trace import TraceTask
    from verifiers.v1.types import AssistantMessage

    return vf.Trace(
        task=TraceTask(type=type(task).__name__, data=task.data, key=task.key, hash=task.hash),
        state=state_cls(type(task))(),
        agent=vf.AgentInfo(config=vf.AgentConfig(), name="swarmrl"),
        nodes=[MessageNode(message=AssistantMessage(content=completion), sampled=True)],
        is_completed=True,
        ok=True,
    )


def verifiers_task(
    seed: int, taskset: str, test_fraction: float = 0.1, chat: bool = True, prefill: str = ""
) -> Task:
    """The named taskset's tasks as prompts (the last `test_fraction` held out), scored by
    their own rewards on the coordinator."""
    tasks = load_tasks(taskset)
    if not tasks:
        raise VerifiersError(f"verifiers taskset {taskset!r} yields no tasks")
    if not any(t.hooks("reward") for t in tasks[:1]):
        raise VerifiersError(f"verifiers taskset {taskset!r} has no reward functions")
    examples = [
        Example(t.data.prompt_text, {"vf_index": i}, _messages(t.data) if chat else None)
        for i, t in enumerate(tasks)
    ]
    n_test = int(len(examples) * test_fraction)
    return Task(
        "verifiers",
        examples[: len(examples) - n_test],
        examples[len(examples) - n_test :],
        [WeightedReward(TasksetReward(tasks))],
        chat=chat,
        prefill=prefill,
        options={"taskset": taskset},
    )


def _messages(data: Any) -> tuple[dict[str, str], ...]:
    """The task's conversation (its system prompt first) in TRL's format."""
    system = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
    return (*system, {"role": "user", "content": data.prompt_text})
