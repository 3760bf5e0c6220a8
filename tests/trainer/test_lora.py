import argparse

import pytest
import torch

from protocol import poolspec
from protocol.errors import SwarmError
from toploc.models import load_model
from trainer import launch, sizing
from trainer.config import LoraSection, from_dict
from trainer.learner import Learner, build_learner, resolve_device
from trainer.lora import add_adapters, save_adapters
from trainer.sizing import ModelTooLargeError


def test_only_adapters_train_and_a_version_carries_only_them(tmp_path):
    model, _ = load_model("tiny")
    full = sum(p.numel() for p in model.parameters())
    wrapped = add_adapters(model, LoraSection(rank=4, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    nbytes = save_adapters(wrapped, tmp_path / "v1", torch.bfloat16)
    assert (tmp_path / "v1" / "adapter_config.json").exists()
    assert nbytes < full * 2 * 0.2  # far below a bf16 copy of the whole model


def test_an_unknown_target_is_refused_with_the_choices():
    model, _ = load_model("tiny")
    with pytest.raises(SwarmError, match=r"\['nope'\].*q_proj"):
        add_adapters(model, LoraSection(rank=4, target_modules=["q_proj", "nope"]))
    with pytest.raises(SwarmError, match="lm_head"):
        add_adapters(model, LoraSection(rank=4, target_modules=["lm_head"]))


def test_a_wrong_device_is_refused_with_what_to_do():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SwarmError, match="use --device cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_run_flags_become_trainer_overrides():
    parser = argparse.ArgumentParser()
    launch.add_flags(parser)
    args = parser.parse_args(["--device", "cpu", "--trainer-procs", "2"])
    assert launch.flag_overrides(args) == ["trainer.device=cpu", "trainer.trainer_procs=2"]


def test_the_adapters_start_from_the_seed_alone():
    """Every trainer rank must build the same adapters, whatever its RNG went through before."""
    lora = LoraSection(rank=4, target_modules=["q_proj"])

    def start(seed: int) -> dict[str, torch.Tensor]:
        wrapped = add_adapters(load_model("tiny")[0], lora, seed)
        return {n: p.detach() for n, p in wrapped.named_parameters() if "lora_A" in n}

    first = start(3)
    torch.rand(100)  # move the global RNG on
    again, other = start(3), start(4)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)


def test_a_lora_pool_too_large_for_its_ranks_is_refused_before_torchrun(tmp_path, monkeypatch):
    spec = poolspec.from_dict({"name": "t", "coordinator": {"public_key": "ab" * 32}})
    config = from_dict({"trainer": {"device": "cpu", "trainer_procs": 2, "lora": {"rank": 4}}})
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(sizing, "free_memory", lambda device_type: 1024)

    def no_exec(*args):
        raise AssertionError("torchrun was started before the size check")

    monkeypatch.setattr(launch.os, "execv", no_exec)
    with pytest.raises(ModelTooLargeError, match="LoRA holds its frozen fp32 weights"):
        launch.start_trainer(spec, config, tmp_path)


def test_rank_zero_publishes_the_gathered_adapters_and_refuses_a_copy_they_do_not_fit(tmp_path):
    """The gather-and-load step of a sharded learner's publishing, on one process: the copy
    gets the trained adapters, and a copy with other trainable weights is refused."""
    spec = poolspec.from_dict({"name": "t", "coordinator": {"public_key": "ab" * 32}})

    def lora_learner(targets: list[str]) -> Learner:
        config = from_dict(
            {"trainer": {"device": "cpu", "lora": {"rank": 4, "target_modules": targets}}}
        )
        return build_learner(spec, config, tmp_path / "_".join(targets))

    trained = lora_learner(["q_proj"])
    with torch.no_grad():
        for name, p in trained.trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # as if trained: peft starts B at zero
    shell = lora_learner(["q_proj"]).trainer.model
    sharded = Learner(trained.trainer, trained.checkpointer, trained.tokenizer, True, shell)
    published = dict(sharded.publishable().named_parameters())
    assert all(torch.equal(published[n], p) for n, p in trained.trainer.model.named_parameters())

    other = lora_learner(["v_proj"]).trainer.model
    mismatched = Learner(trained.trainer, trained.checkpointer, trained.tokenizer, True, other)
    with pytest.raises(SwarmError, match="do not match the publishing copy"):
        mismatched.publishable()
