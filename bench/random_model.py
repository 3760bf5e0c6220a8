"""Write a Hugging Face folder holding a model of a chosen shape with random weights, for
measuring speed and memory at sizes nobody has to download (a GPU machine cut off from the hub,
or shapes larger than any checkpoint at hand). The tokenizer and the rest of the config come
from an existing model folder or preset; the shape options override its config.

    python bench/random_model.py --like smollm2-135m -o /tmp/smollm2-random
    python bench/random_model.py --like smollm2-135m --shape 0.5b -o /tmp/llama-0.5b-random
    python bench/scale.py --device cuda --only checkpoint --model /tmp/llama-0.5b-random

Weights are random, so only timings, bytes and memory mean anything: a random model never
stops early, and its rollouts all run to the token limit.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toploc.models import model_dir

# Layer dimensions of public models, on the --like model's architecture and vocabulary:
# (hidden, layers, attention heads, key/value heads, MLP width). Qwen2.5's, from its configs.
SHAPES = {
    "0.5b": (896, 24, 14, 2, 4864),
    "1.5b": (1536, 28, 12, 2, 8960),
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def write_random_model(like: str, out: Path, shape: str | None, dtype: str, seed: int) -> int:
    """Save the random model and `like`'s tokenizer into `out`; returns the parameter count."""
    source = model_dir(like)
    config = AutoConfig.from_pretrained(source)
    if shape is not None:
        hidden, layers, heads, kv_heads, mlp = SHAPES[shape]
        config.hidden_size, config.num_hidden_layers, config.intermediate_size = hidden, layers, mlp
        config.num_attention_heads, config.num_key_value_heads = heads, kv_heads
        config.head_dim = hidden // heads
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--like", required=True, help="preset, HF folder or id")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="layer sizes (default: like's)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    params = write_random_model(args.like, args.out, args.shape, args.dtype, args.seed)
    print(f"{args.out}: {params / 1e6:.0f}M parameters, random weights")


if __name__ == "__main__":
    main()
