"""Scoring with a `verifiers` (>= 0.4) taskset's own rewards, on the coordinator.

verifiers 0.4 (`verifiers.v1`) describes an environment as a taskset (config in, typed tasks
out) whose tasks score a finished rollout with their `@vf.reward` methods (and plugged reward
functions), recorded on a `Trace`. Each completion is scored by its task's own `score()` on a
trace that holds it as one sampled assistant message. Rewards that need a runtime (a container
the rollout ran in) have no runtime here and are skipped, as `verifiers` itself skips them when
scoring offline. Kept apart from the task builder so `trainer.rewards` can name the function.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from typing import Any

from protocol.errors import SwarmError

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


@functools.lru_cache(maxsize=4)
def cached_tasks(taskset: str) -> list[Any]:
    """`load_tasks(taskset)`, read once per process."""
    return load_tasks(taskset)


def verifiers_reward(
    prompts: list[str],
    completions: list[str],
    vf_taskset: list[str],
    vf_index: list[int],
    **_: Any,
) -> list[float | None]:
    """Each completion scored by its verifiers task's own rewards (their weighted sum, as
    `verifiers` totals them); None where none of them ran."""
    rows = zip(vf_taskset, vf_index, completions, strict=True)
    return [task_reward(cached_tasks(name)[i], text) for name, i, text in rows]


def task_reward(task: Any, completion: str) -> float | None:
    """`task`'s reward for `completion`, or None when none of its rewards ran."""
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
