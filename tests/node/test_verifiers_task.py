"""A verifiers (0.4) taskset as a task: prompts from its tasks, rewards from their own
`@vf.reward` methods, computed by the coordinator's validator."""

import textwrap

import pytest

from node.engine import HFEngine, offline_lease
from protocol.errors import SwarmError
from toploc.models import eos_token_ids
from trainer.environments.verifiers_reward import VerifiersError
from trainer.tasks import make_task

PARITY = """
import verifiers.v1 as vf


class ParityTask(vf.Task):
    @vf.reward(weight=2.0)
    async def correct(self, task, trace) -> float:
        n = int(task.prompt_text.split()[-1])
        return float(trace.last_reply.strip() == ("even" if n % 2 == 0 else "odd"))


class ParityTaskset(vf.Taskset):
    def load(self):
        for n in range(20):
            yield ParityTask(vf.TaskData(prompt=f"parity of {n}"), self.config.task)


__all__ = ["ParityTaskset"]
"""

NO_REWARD = """
import verifiers.v1 as vf


class Plain(vf.Taskset):
    def load(self):
        yield vf.Task(vf.TaskData(prompt="hello"))


__all__ = ["Plain"]
"""


@pytest.fixture
def tasksets(tmp_path, monkeypatch):
    # Imported here, not skipped when missing: scripts/setup.sh installs the verifiers extra,
    # so a missing package fails these tests (and .venv-vllm, without it, still collects them).
    import verifiers.v1  # noqa: F401

    for name, source in (("swarmrl_vf_parity", PARITY), ("swarmrl_vf_plain", NO_REWARD)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_taskset_prompts_and_rewards_come_from_verifiers(tasksets):
    task = make_task("verifiers", 0, {"taskset": "swarmrl_vf_parity", "chat": False})
    assert (len(task.train), len(task.test)) == (18, 2)
    assert task.train[3].prompt == "parity of 3"
    reward = task.rewards[0].func
    # the task's weight (2) applies, as verifiers totals it
    names = ["swarmrl_vf_parity"] * 3
    got = reward(["", "", ""], ["even", "odd", "odd"], vf_taskset=names, vf_index=[0, 0, 3])
    assert got == [2.0, 0.0, 2.0]


def test_the_validator_scores_rollouts_with_the_taskset_rewards(tasksets, tiny, validate):
    task = make_task("verifiers", 0, {"taskset": "swarmrl_vf_parity", "chat": False})
    prompts = [
        tiny.tok(task.render(task.train[i], tiny.tok), add_special_tokens=False)["input_ids"]
        for i in (2, 5)
    ]
    eos = eos_token_ids(tiny.model, tiny.tok)
    lease = offline_lease(prompts, group_size=4, max_new_tokens=6, eos_token_ids=eos)
    engine = HFEngine()
    engine.model, engine.pad_token_id = tiny.model, tiny.tok.pad_token_id
    verdict = validate(tiny.model, tiny.tok, task, lease, engine.generate(lease), 0)
    assert verdict.outcome == "accept", verdict
    for group in verdict.groups:
        example = task.train[group.prompt_index]
        want = "even" if example.columns["vf_index"] % 2 == 0 else "odd"
        assert group.rewards == [2.0 * (c.strip() == want) for c in group.completions]
        assert list(group.per_func) == ["verifiers_reward"]


def test_unusable_tasksets_are_refused(tasksets):
    with pytest.raises(VerifiersError):
        make_task("verifiers", 0, {"taskset": "swarmrl_no_such_taskset"})
    with pytest.raises(VerifiersError):
        make_task("verifiers", 0, {"taskset": "swarmrl_vf_plain"})
    with pytest.raises(SwarmError):
        make_task("verifiers", 0, {"no_taskset": 1})
