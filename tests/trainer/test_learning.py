"""With honest in-process rollouts, the tiny model learns the toy task: the trainer, loss,
sampler and rewards work together. Deterministic (seeded, one thread), so it cannot flake."""

import pytest

from trainer.local import train_locally
from trainer.presets import local_config

pytestmark = pytest.mark.timeout(600)


def test_tiny_model_learns_to_copy():
    cfg = local_config("tiny", steps=200)  # what `coordinator init` gives a new pool
    r = train_locally(cfg, eval_limit=20, progress=False)
    assert r["steps"] == 200
    assert r["reward_first_10pct"] < 0.1
    assert r["reward_last_10pct"] > r["reward_first_10pct"] + 0.1, r["curve"][-10:]
