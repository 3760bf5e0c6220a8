"""`--validator-device`: validators load published versions and prefill on their own device."""

import argparse

import pytest
import torch

from protocol.errors import SwarmError
from tests.trainer.pools import tiny_coordinator
from tests.trainer.test_validator import G, honest, world  # noqa: F401 (a fixture)
from trainer import config as trainer_config
from trainer import launch
from trainer.learner import resolve_device
from trainer.policy import PolicyStore
from trainer.validator import Validator


def test_the_flag_becomes_a_trainer_override():
    parser = argparse.ArgumentParser()
    launch.add_flags(parser)
    args = parser.parse_args(["--validator-device", "cpu"])
    assert launch.flag_overrides(args) == ["trainer.validator_device=cpu"]


def test_cuda_without_cuda_is_refused_by_the_flag_that_asked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SwarmError, match="--validator-device cuda: CUDA is not available") as e:
        resolve_device("cuda", "--validator-device")
    assert "use --validator-device cpu" in str(e.value)


def test_a_coordinator_refuses_it_before_it_makes_a_ledger(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = trainer_config.from_dict({"trainer": {"validator_device": "cuda"}})
    with pytest.raises(SwarmError, match="--validator-device"):
        tiny_coordinator(tmp_path, config)
    assert not (tmp_path / "ledger.sqlite").exists()


def test_a_cpu_coordinator_loads_versions_for_its_validators_on_the_cpu(tmp_path):
    config = trainer_config.from_dict({"trainer": {"validator_device": "auto"}})
    c = tiny_coordinator(tmp_path, config)
    try:
        c.policy.export(c.training.learner.trainer.model, c.tokenizer, 0)
        expected = "cuda" if torch.cuda.is_available() else "cpu"
        assert c.policy.model(0).device.type == expected
    finally:
        c.ledger.close()


@pytest.mark.gpu
def test_rollouts_made_on_the_cpu_pass_validation_on_cuda(world, tmp_path):  # noqa: F811
    model, tok, lease, cpu_validator = world
    store = PolicyStore(tmp_path / "weights", "float32", keep=2, cache_models=1, device="cuda")
    store.export(model, tok, 1)
    assert store.model(1).device.type == "cuda"
    gpu_validator = Validator(
        cpu_validator.spec, cpu_validator.task, tok, store.model, len(tok), tok.pad_token_id
    )
    sub = honest(model, tok, lease)
    assert len(sub.results[0].completions) == G
    verdict = gpu_validator.validate(sub, lease, current_version=1)
    assert verdict.outcome == "accept", verdict.reason
