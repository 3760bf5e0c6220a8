from types import SimpleNamespace

import pytest

from node.engine import offline_lease, sampling_params
from protocol import messages as msg
from protocol import poolspec
from toploc.models import eos_token_ids, load_model
from trainer.tasks import make_task
from trainer.validator import LeaseView, Validator


@pytest.fixture
def tiny():
    """The tiny model, its copy task, and a lease of 3 prompts x 4 samples."""
    model, tok = load_model("tiny")
    task = make_task("copy", 0)
    prompts = [
        tok(task.render(task.train[i], tok), add_special_tokens=False)["input_ids"]
        for i in range(3)
    ]
    eos = eos_token_ids(model, tok)
    lease = offline_lease(
        prompts, group_size=4, max_new_tokens=40, eos_token_ids=eos, first_seed=77
    )
    return SimpleNamespace(model=model, tok=tok, task=task, lease=lease)


@pytest.fixture
def validate():
    """The coordinator's verdict on an engine's results for an offline lease."""

    def check(model, tok, task, lease: msg.Lease, results, version: int):
        spec = poolspec.from_dict({"name": "t", "coordinator": {"public_key": "ab" * 32}})
        validator = Validator(spec, task, tok, lambda v: model, len(tok), tok.pad_token_id)
        view = LeaseView.of(lease, sampling_params(lease))
        sub = msg.Submission(lease_id=1, weight_version=version, results=results)
        return validator.validate(sub, view, current_version=version)

    return check
