"""LoRA adapters through peft: which layers get them, and what a version carries.

Only the adapters train (the base stays frozen in the pool's published base version), so the
optimizer state, the checkpoints and every version after the base hold only the adapters. How
nodes and validators turn an adapter version back into weights: `toploc/versions.py`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from transformers import PreTrainedModel

from protocol.errors import SwarmError
from shardcast.manifest import declare_requires
from toploc.versions import ADAPTER_FILE, write_meta
from trainer.config import LoraSection


def linear_names(model: torch.nn.Module) -> set[str]:
    """The last name part of every linear layer: what `target_modules` may name."""
    return {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def add_adapters(model: torch.nn.Module, lora: LoraSection, seed: int = 0) -> PeftModel:
    """Wrap `model` with trainable adapters on `lora.target_modules`; anything else frozen. An
    unknown target, or the tied output head, is refused before any training. The adapters'
    random start depends on `seed` only: every trainer rank must start from the same adapters
    (FSDP2 shards each rank's own copy, it does not broadcast rank 0's)."""
    names = linear_names(model) - {"lm_head"}
    unknown = sorted(set(lora.target_modules) - names)
    if unknown:
        raise SwarmError(
            f"LoRA target_modules {unknown} are not linear layers of this model; pick from "
            f"{sorted(names)} in [trainer.lora] target_modules"
        )
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        lora_dropout=0.0,  # dropout would make the trainer's logprobs differ from the nodes'
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def save_adapters(model: PeftModel, folder: Path, dtype: torch.dtype) -> int:
    """Write the adapters (in the pool dtype) and their peft config to `folder`; their bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to(dtype).contiguous().cpu()
        for k, v in get_peft_model_state_dict(model).items()
    }
    save_file(state, folder / ADAPTER_FILE)
    # peft holds target_modules as a set and writes it in hash order, which changes from one
    # process to the next; sorted, a version's bytes do not depend on which process wrote it.
    config = copy.copy(model.peft_config["default"])
    config.target_modules = sorted(config.target_modules)
    config.save_pretrained(str(folder))
    return sum(f.stat().st_size for f in folder.iterdir())


def scale_of(model: PeftModel) -> float:
    """peft's factor on B @ A (alpha / rank), the same for every adapted layer here."""
    scales = {m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)}
    if len(scales) != 1:
        raise SwarmError(f"expected one LoRA scaling for all layers, found {sorted(scales)}")
    return scales.pop()


def base_model(model: PeftModel, dtype: torch.dtype) -> PreTrainedModel:
    """A copy of the frozen base without the adapters, in `dtype`: the pool's base version."""
    return copy.deepcopy(model).unload().to(dtype).eval()


def save_adapter_version(
    model: PeftModel,
    folder: Path,
    dtype: torch.dtype,
    base_version: int,
    base_files: dict[str, str],
) -> int:
    """Write an adapter version bound to the base version whose files hash to `base_files`;
    its bytes. SHARDCAST publishes it as requiring that base, so holders keep the base for
    as long as they keep the version, and nodes that join late still fetch it."""
    save_adapters(model, folder, dtype)
    write_meta(folder, base_version, base_files, scale_of(model))
    declare_requires(folder, [base_version])
    return sum(f.stat().st_size for f in folder.iterdir())
