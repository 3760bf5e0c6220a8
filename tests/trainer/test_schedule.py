"""The learning-rate schedule (`trainer.schedule`), hand-computed, and as the trainer and the
config apply it."""

import math

import pytest

from protocol.errors import PoolSpecError
from tests.trainer.test_grpo import _group
from toploc.models import load_model
from trainer import config
from trainer.config import AlgorithmSection
from trainer.grpo import GRPOTrainer
from trainer.schedule import lr_factor


def test_warm_up_then_constant():
    assert [lr_factor(s, warmup=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0) == lr_factor(1000) == 1.0


def test_linear_decay_reaches_its_floor_at_decay_steps_and_stays():
    # no warm-up, 10 steps to a floor of 0.1: 1 - 0.9 x step / 10
    got = [lr_factor(s, decay="linear", decay_steps=10, floor=0.1) for s in (0, 5, 10, 40)]
    assert got == pytest.approx([1.0, 0.55, 0.1, 0.1])
    # a warm-up of 2 (0.5, 1.0), then from 1 at step 2 to 0 at step 6: 0.75 at step 3
    got = [lr_factor(s, warmup=2, decay="linear", decay_steps=6) for s in range(7)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])


def test_cosine_decay_follows_half_a_cosine():
    # halfway (step 5 of 10) a half cosine is at its midpoint; a quarter in, (1 + cos(pi/4)) / 2
    assert lr_factor(5, decay="cosine", decay_steps=10) == pytest.approx(0.5)
    quarter = (1 + math.cos(math.pi / 4)) / 2
    assert lr_factor(2, decay="cosine", decay_steps=8) == pytest.approx(quarter)
    assert lr_factor(10, decay="cosine", decay_steps=10, floor=0.2) == pytest.approx(0.2)
    assert lr_factor(7, decay="cosine", decay_steps=10, floor=0.2) == pytest.approx(
        0.2 + 0.8 * (1 + math.cos(0.7 * math.pi)) / 2
    )


def test_a_decay_without_its_length_is_refused_with_what_to_set():
    with pytest.raises(PoolSpecError, match=r"algorithm\.decay_steps"):
        config.from_dict({"algorithm": {"lr_decay": "linear"}})
    with pytest.raises(PoolSpecError, match=r"past algorithm\.warmup_steps"):
        config.from_dict({"algorithm": {"lr_decay": "cosine", "warmup_steps": 5, "decay_steps": 5}})
    with pytest.raises(PoolSpecError):
        config.from_dict({"algorithm": {"lr_decay": "step"}})
    ok = config.from_dict({"algorithm": {"lr_decay": "linear", "decay_steps": 40}})
    assert ok.algorithm.decay_steps == 40


def test_the_trainer_steps_along_the_schedule_and_a_new_rate_scales_it():
    model, _ = load_model("tiny")
    algorithm = AlgorithmSection(lr=1e-3, lr_decay="linear", decay_steps=4, micro_batch=4)
    trainer = GRPOTrainer(model, algorithm, temperature=1.0, max_new_tokens=8)
    rates = []
    for step in range(5):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        result = trainer.step([_group(step, [1.0, 0.0])], 0)
        assert result.metrics["lr"] == pytest.approx(rates[-1])
    assert rates == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0])
    trainer.set_lr(2e-3)  # a restart with another algorithm.lr: the same curve, scaled
    assert trainer.optimizer.param_groups[0]["lr"] == 0.0
    trainer.scheduler.last_epoch = 1
    trainer.set_lr(2e-3)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1.5e-3)
