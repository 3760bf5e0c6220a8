"""A `verifiers` taskset as a swarmrl task: its tasks' prompts, its rewards on the coordinator.

    [task]
    name = "verifiers"
    options = { taskset = "my-taskset" }   # an installed verifiers (>= 0.4) taskset package

The taskset's tasks become prompts (system prompt and user prompt as a chat); rewards are
`trainer.environments.verifiers_reward`, the tasks' own. A taskset whose tasks declare no reward
is refused up front.

Only single-turn use: a verifiers agent's tool calls run through harnesses and tool servers,
which are neither deterministic nor cheap enough for the coordinator to replay.
"""

from __future__ import annotations

from typing import Any

from trainer.environments.verifiers_reward import VerifiersError, load_tasks, verifiers_reward
from trainer.rewards import WeightedReward
from trainer.tasks import Example, Task


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
        Example(
            t.data.prompt_text,
            {"vf_taskset": taskset, "vf_index": i},
            _messages(t.data) if chat else None,
        )
        for i, t in enumerate(tasks)
    ]
    n_test = int(len(examples) * test_fraction)
    return Task(
        "verifiers",
        examples[: len(examples) - n_test],
        examples[len(examples) - n_test :],
        [WeightedReward(verifiers_reward)],
        chat=chat,
        prefill=prefill,
        options={"taskset": taskset},
    )


def _messages(data: Any) -> tuple[dict[str, str], ...]:
    """The task's conversation (its system prompt first) in TRL's format."""
    system = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
    return (*system, {"role": "user", "content": data.prompt_text})
