"""Bring your own model and data, offline: a Hugging Face-format model in the HF cache under an
`org/name` id and a dataset folder with its own column names make a pool with `coordinator
init`, and a node trains it through `coordinator run` (weights reach the node by SHARDCAST)."""

import json
import re
import subprocess
import sys

import pytest

from tests.integration.pool import Coordinator, Node, _env
from tests.trainer.test_init_models import cache_model, llama


@pytest.mark.slow
def test_a_cached_hub_model_and_a_local_dataset_train_offline(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    # Every process started below (init, run, the node) inherits these; the node never reads
    # the hub cache: its weights come from the coordinator's SHARDCAST origin.
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("SWARMRL_CACHE", str(tmp_path / "swarmrl-cache"))
    cache_model(hub, "acme/tiny-digits", llama())
    data = tmp_path / "digits"
    data.mkdir()
    rows = [{"ask": f"copy {i:02d}=", "want": f"{i:02d}"} for i in range(100)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:80]))
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[80:]))

    c = Coordinator(home=tmp_path / "home", spec=tmp_path / "pool.toml", data=tmp_path / "c")
    init = [
        *("--model", "acme/tiny-digits", "--dataset", str(data)),
        *("--prompt-column", "ask", "--answer-column", "want", "--reward", "position_match"),
        *("--listen", f"/ip4/127.0.0.1/tcp/{c.p2p_port}"),
        *("--origin", f"http://127.0.0.1:{c.origin_port}", "-o", str(c.spec)),
    ]
    for s in (
        "sampling.max_new_tokens=3",
        "sampling.group_size=4",
        "algorithm.batch_prompts=2",
        "limits.lease_prompts=2",
        "limits.lease_timeout_s=20.0",
        "algorithm.lr=2e-3",
    ):
        init += ["--set", s]
    out = subprocess.run(
        [sys.executable, "-m", "trainer", "init", *init],
        env=_env(c.home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    c.pool_id = re.search(r"pool id: (\w+)", out.stdout).group(1)
    node = Node("n0", tmp_path / "n0")
    try:
        c.start(max_steps=3, timeout=180)
        node.start(c.pool_id, c.bootstrap)
        status = c.wait_for(lambda s: s["step"] >= 3, timeout=240, what="3 training steps")
    finally:
        node.kill()
        c.kill()
    assert status["step"] >= 3
    assert "acme/tiny-digits@" in c.spec.read_text()
