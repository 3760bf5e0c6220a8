"""Adapter versions: merged as peft computes them, bound to their exact base, and the base kept
for as long as they need it."""

import shutil

import pytest
import torch
from lora_helpers import publish, trained_adapters
from safetensors.torch import load_file, save_file

from toploc.models import load_model
from toploc.versions import (
    ADAPTER_FILE,
    BaseMismatchError,
    BaseMissingError,
    VersionLoader,
    adapter_meta,
)
from trainer.policy import PolicyStore

IDS = torch.tensor([[1, 5, 9, 13, 7, 2]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_adapters_that_fit_no_weight_of_the_base_are_refused(tmp_path):
    publish(tmp_path, [1])
    tensors = load_file(tmp_path / "v1" / ADAPTER_FILE)
    for key in tensors:
        if key.endswith("lora_A.weight"):
            tensors[key] = torch.zeros(4, 3)  # the base's q_proj takes wider inputs
    save_file(tensors, tmp_path / "v1" / ADAPTER_FILE)
    with pytest.raises(BaseMismatchError, match="fit no weight"):
        VersionLoader(torch.float32, reuse_base=False).load(tmp_path / "v1")


def test_the_merged_version_computes_what_peft_computes(tmp_path):
    (wrapped,) = publish(tmp_path, [1])
    merged = VersionLoader(torch.float32, reuse_base=False).load(tmp_path / "v1")
    base = VersionLoader(torch.float32, reuse_base=False).load(tmp_path / "v0")
    assert torch.allclose(logits(merged), logits(wrapped), atol=1e-5)
    assert not torch.allclose(logits(base), logits(wrapped), atol=1e-3)


def test_a_missing_or_other_base_is_refused(tmp_path):
    publish(tmp_path / "pool", [1])
    alone = tmp_path / "alone"
    shutil.copytree(tmp_path / "pool" / "v1", alone / "v1")
    with pytest.raises(BaseMissingError, match="base version v0"):
        VersionLoader(torch.float32, reuse_base=False).load(alone / "v1")
    # A base of other bytes under the right number (a relay's or a disk's doing) is refused.
    other, tok = load_model("tiny", "float32", 7)
    other.save_pretrained(alone / "v0")
    tok.save_pretrained(alone / "v0")
    with pytest.raises(BaseMismatchError, match=r"model\.safetensors"):
        VersionLoader(torch.float32, reuse_base=False).load(alone / "v1")


def test_an_engine_keeps_the_base_after_its_folder_is_pruned(tmp_path):
    publish(tmp_path, [1, 2])
    fresh = logits(VersionLoader(torch.float32, reuse_base=False).load(tmp_path / "v2"))
    engine = VersionLoader(torch.float32, reuse_base=True)
    first = engine.load(tmp_path / "v1")
    shutil.rmtree(tmp_path / "v0")
    second = engine.load(tmp_path / "v2")
    assert second is first  # the base stayed loaded; only the adapted weights changed
    assert torch.equal(logits(second), fresh)  # merged onto the base, not onto v1


def test_the_store_keeps_the_base_while_adapter_versions_apply_to_it(tmp_path):
    wrapped, tok = trained_adapters(1)
    store = PolicyStore(tmp_path, "float32", keep=2, cache_models=0)
    for v in range(4):
        store.export(wrapped, tok, v)
    assert store.versions() == [0, 2, 3]
    assert adapter_meta(store.folder(0)) is None
    assert adapter_meta(store.folder(3)).base_version == 0


def test_only_the_first_version_loaded_shows_a_progress_bar(tmp_path, capfd):
    """A node loads a version per training step: one progress bar each flooded its log."""
    from transformers.utils import logging as hf_logging

    model, tok = load_model("tiny", "float32", 0)
    for v in ("v0", "v1"):
        model.save_pretrained(tmp_path / v)
        tok.save_pretrained(tmp_path / v)
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        loader = VersionLoader(torch.float32, reuse_base=True)
        capfd.readouterr()
        loader.load(tmp_path / "v0")
        assert "Loading weights" in capfd.readouterr().err
        loader.load(tmp_path / "v1")
        assert "Loading weights" not in capfd.readouterr().err
    finally:
        (hf_logging.enable_progress_bar if was_on else hf_logging.disable_progress_bar)()
