"""With honest in-process rollouts, the tiny model learns the toy task: the trainer, loss,
sampler and rewards work together. Deterministic (seeded, one thread), so it cannot flake."""

import pytest

from trainer.local import train_locally

pytestmark = pytest.mark.timeout(600)


def test_tiny_model_learns_to_copy():
    cfg = dict(
        model="tiny",
        dtype="float32",
        task="copy",
        options={"digits": 2},
        lr=2e-3,
        prompts=16,
        group=8,
        max_new_tokens=4,
        steps=200,
    )
    r = train_locally(cfg, eval_limit=20, progress=False)
    assert r["steps"] == 200
    assert r["reward_first_10pct"] < 0.1
    assert r["reward_last_10pct"] > r["reward_first_10pct"] + 0.1, r["curve"][-10:]
