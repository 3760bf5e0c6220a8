"""Adapter versions of the tiny model for tests: a base and adapter versions as if trained."""

from pathlib import Path

import torch

from toploc.models import load_model
from toploc.versions import folder_hashes
from trainer.config import LoraSection
from trainer.lora import add_adapters, base_model, save_adapter_version


def trained_adapters(seed: int):
    """The tiny model with adapters as if trained: B is zero when peft makes it."""
    model, tok = load_model("tiny")
    wrapped = add_adapters(
        model, LoraSection(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return wrapped.eval(), tok


def publish(folder: Path, seeds: list[int]):
    """`folder/v0` the base, `folder/v{i}` an adapter version per seed (the node's layout)."""
    wrapped, tok = trained_adapters(seeds[0])
    base_model(wrapped, torch.float32).save_pretrained(folder / "v0")
    tok.save_pretrained(folder / "v0")
    hashes = folder_hashes(folder / "v0")
    models = []
    for i, seed in enumerate(seeds, start=1):
        wrapped, _ = trained_adapters(seed)
        save_adapter_version(wrapped, folder / f"v{i}", torch.float32, 0, hashes)
        models.append(wrapped)
    return models
