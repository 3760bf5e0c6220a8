"""What `coordinator init` checks of a model before writing a pool around it.

Everything here reads the config and the tokenizer and builds the model on the `meta` device
(no memory, no weights read), so a 7B model is checked in about a second; a missing piece is
refused at once, by name, instead of at the first lease.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toploc.hub import ModelError, is_hub_id, pinned
from toploc.models import SMOLLM2, TINY, model_dir

_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class UnsupportedModelError(ModelError):
    """A model the engines cannot run: not a causal LM, or no LM head to prove activations at."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    """What the pool spec records: a preset, a folder, or a pinned `org/name@<commit>`."""
    folder: Path
    architecture: str
    parameters: int
    chat_template: bool
    """Prompts can be rendered as chat turns; otherwise they are plain text."""
    max_positions: int | None


def inspect_model(name: str) -> ModelInfo:
    """Resolve `name`, then check it has a config the causal-LM engines support, weights and a
    tokenizer. Raises a ModelError naming what is missing."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = model_dir(name)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise UnsupportedModelError(
            f"model {name!r}: transformers cannot read its config.json ({_first_line(e)}); "
            "a newer transformers may know this architecture"
        ) from None
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"model {name!r} is an encoder-decoder ({config.model_type}); swarmrl trains "
            "decoder-only causal LMs"
        )
    if name not in (TINY, SMOLLM2) and not any(any(folder.glob(p)) for p in _WEIGHTS):
        raise ModelError(f"model {name!r} has no weights (*.safetensors) in {folder}")
    if not any((folder / f).exists() for f in _TOKENIZER_FILES):
        raise ModelError(
            f"model {name!r} has no tokenizer in {folder} (none of {', '.join(_TOKENIZER_FILES)}): "
            "save the tokenizer next to the weights (tokenizer.save_pretrained)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelError(f"model {name!r}: its tokenizer does not load: {_first_line(e)}") from None
    try:
        # The meta device allocates nothing: parameter counts and the module tree, for free.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise UnsupportedModelError(
            f"model {name!r} ({type(config).__name__}) is not a causal LM transformers can "
            f"build: {_first_line(e)}"
        ) from None
    if model.get_output_embeddings() is None:
        # The hf engine and the validator prove and check the LM head's input.
        raise UnsupportedModelError(f"model {name!r} has no LM head (output embeddings)")
    return ModelInfo(
        name=pinned(name, folder) if is_hub_id(name) and "@" not in name else name,
        folder=folder,
        architecture=type(model).__name__,
        parameters=sum(p.numel() for p in model.parameters()),
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
        max_positions=getattr(config, "max_position_embeddings", None),
    )


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
