"""bench/random_model.py: the random-weight models the GPU figures were measured on load as
any model folder does, with the shape asked for and the source's tokenizer."""

import importlib.util
from pathlib import Path

import torch

from toploc.models import load_model

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "random_model.py"


def _module():
    spec = importlib.util.spec_from_file_location("random_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_random_model_takes_the_shape_asked_for_and_the_source_tokenizer(tmp_path, monkeypatch):
    random_model = _module()
    monkeypatch.setitem(random_model.SHAPES, "small", (96, 3, 4, 2, 160))
    params = random_model.write_random_model("tiny", tmp_path / "m", "small", "float32", seed=1)
    model, tok = load_model(str(tmp_path / "m"))
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (96, 3, 160)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 24)
    assert sum(p.numel() for p in model.parameters()) == params
    tiny, tiny_tok = load_model("tiny")
    assert tok.get_vocab() == tiny_tok.get_vocab()
    assert config.vocab_size == tiny.config.vocab_size


def test_the_same_seed_writes_the_same_weights_and_another_does_not(tmp_path):
    random_model = _module()
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        random_model.write_random_model("tiny", tmp_path / name, None, "float32", seed)
    a, b, c = (load_model(str(tmp_path / n))[0].state_dict() for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
