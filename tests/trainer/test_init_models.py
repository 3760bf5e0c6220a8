"""`coordinator init` with models named by Hugging Face id, folder or preset.

The models are real Hugging Face folders (save_pretrained) placed in a temporary HF cache in
the hub's own layout (`models--org--name/snapshots/<commit>`, `refs/main`), so the hub client
resolves them offline exactly as it would a downloaded model.
"""

import json
import tomllib

import pytest
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from toploc.models import tiny_tokenizer
from trainer.cli import main
from trainer.sizing import SIZE_CLASSES, size_class

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_model(hub, repo, model, tokenizer=True):
    """Save `model` (and the tiny tokenizer) as the cached snapshot of `repo`."""
    root = hub / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    model.save_pretrained(snapshot)
    if tokenizer:
        tiny_tokenizer().save_pretrained(snapshot)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    return snapshot


def llama():
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants

    folder = tmp_path / "hub"
    folder.mkdir()
    # The hub client reads its cache folder from this constant at call time.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("SWARMRL_CACHE", str(tmp_path / "swarmrl-cache"))
    return folder


def init(tmp_path, *args):
    out = tmp_path / "pool.toml"
    code = main(["init", "--key", str(tmp_path / "c.key"), "-o", str(out), *args])
    return code, out


def test_a_cached_hub_id_makes_a_pool_pinned_to_its_commit(hub, tmp_path, capsys):
    cache_model(hub, "acme/tiny-chat", llama())
    code, out = init(tmp_path, "--model", "acme/tiny-chat")
    printed = capsys.readouterr().out
    assert code == 0, printed
    spec = tomllib.loads(out.read_text())
    assert spec["model"]["name"] == f"acme/tiny-chat@{COMMIT}"
    # Size-aware defaults, said aloud: never the tiny preset's lr 2e-3 / micro-batch 128.
    assert "LlamaForCausalLM, 0.1M parameters, chat template" in printed
    assert "size class test-scale (<20M): lr 0.001" in printed
    assert spec["algorithm"]["lr"] == 1e-3 and spec["algorithm"]["micro_batch"] == 64
    assert spec["task"]["name"] == "arithmetic" and spec["task"]["options"]["chat"] is True
    assert spec["task"]["rewards"] == ["exact_numeric"]
    assert (tmp_path / "c.key").exists()
    # The pinned name resolves offline too, as `coordinator run` will resolve it.
    from toploc.models import load_model

    model, tok = load_model(spec["model"]["name"])
    assert model.config.hidden_size == 64 and tok.chat_template


def test_missing_and_unusable_models_are_refused_by_name(hub, tmp_path, capsys):
    code, out = init(tmp_path, "--model", "acme/absent")
    err = capsys.readouterr().err
    assert code == 2 and "model 'acme/absent' is not in the Hugging Face cache" in err
    assert not out.exists() and not (tmp_path / "c.key").exists()  # nothing left behind

    cache_model(hub, "acme/no-tokenizer", llama(), tokenizer=False)
    code, _ = init(tmp_path, "--model", "acme/no-tokenizer")
    assert code == 2 and "has no tokenizer" in capsys.readouterr().err

    t5 = T5Config(
        vocab_size=len(tiny_tokenizer()), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2
    )
    cache_model(hub, "acme/t5", T5ForConditionalGeneration(t5))
    code, _ = init(tmp_path, "--model", "acme/t5")
    assert code == 2 and "is an encoder-decoder (t5)" in capsys.readouterr().err

    folder = cache_model(hub, "acme/future", llama())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama9"}))
    code, _ = init(tmp_path, "--model", str(folder))
    assert code == 2 and "transformers cannot read its config.json" in capsys.readouterr().err

    code, _ = init(tmp_path, "--model", str(tmp_path / "nowhere"))
    assert code == 2 and "unknown model" in capsys.readouterr().err
    assert not (tmp_path / "c.key").exists()


def test_a_local_dataset_with_its_own_columns(hub, tmp_path, capsys):
    cache_model(hub, "acme/tiny-chat", llama())
    data = tmp_path / "quiz"
    data.mkdir()
    rows = [{"ask": f"what is {i} + 2?", "final": str(i + 2)} for i in range(30)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:24]))
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[24:]))
    args = ["--model", "acme/tiny-chat", "--dataset", str(data), "--limit", "10"]
    code, _ = init(tmp_path, *args)
    assert code == 2 and "no prompt column found" in capsys.readouterr().err
    code, out = init(tmp_path, *args, "--prompt-column", "ask", "--answer-column", "final")
    printed = capsys.readouterr().out
    assert code == 0, printed
    spec = tomllib.loads(out.read_text())
    task = spec["task"]
    assert task["limit"] == 10 and task["rewards"] == ["exact_numeric"]
    assert task["options"]["source"] == str(data) and task["options"]["eval_split"] == "test"
    assert "task dataset: 10 training prompts, 6 held out" in printed
    assert task["options"]["chat"] is True and spec["sampling"]["max_new_tokens"] == 256


def test_gsm8k_without_data_is_refused_with_what_to_do(hub, tmp_path, capsys):
    cache_model(hub, "acme/tiny-chat", llama())
    code, _ = init(tmp_path, "--model", "acme/tiny-chat", "--task", "gsm8k")
    assert code == 2 and "task gsm8k reads a dataset: give it with --dataset" in (
        capsys.readouterr().err
    )


def test_presets_keep_their_measured_settings(hub, tmp_path):
    code, out = init(tmp_path, "--model", "tiny")
    assert code == 0
    spec = tomllib.loads(out.read_text())
    assert spec["algorithm"]["lr"] == 2e-3 and spec["task"]["name"] == "copy"


def test_size_classes_cover_every_size_in_order():
    bounds = [c.up_to for c in SIZE_CLASSES]
    assert bounds == sorted(bounds) and bounds[-1] == float("inf")
    assert size_class(135_000_000).lr == 1e-5  # SmolLM2-135M's measured rate
    assert size_class(494_000_000).lr == 1e-6  # Qwen2.5-0.5B: TRL's GRPO default
    lrs = [c.lr for c in SIZE_CLASSES]
    assert lrs == sorted(lrs, reverse=True)
