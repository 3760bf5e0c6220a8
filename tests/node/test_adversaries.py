"""The open-pool cheats of `examples/byzantine.py`, where they can be judged without a pool:
what they send must look right to the coordinator's cheap checks, so that what catches them in
the swarm is the expensive check or admission, as intended."""

from __future__ import annotations

import sys
from pathlib import Path

from node.engine import HFEngine

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from byzantine import ValidationFlooder


def test_flooder_junk_passes_every_cheap_check_and_only_a_prefill_refuses_it(tiny, validate):
    engine = HFEngine(dtype="float32")
    engine.model = tiny.model  # the flooder reads only the vocabulary size
    results = ValidationFlooder().generate(engine, tiny.lease)
    cap = tiny.lease.sampling.max_new_tokens
    # the largest answer allowed: every sample at the token cap
    assert all(len(c.tokens) == cap for r in results for c in r.completions)
    verdict = validate(tiny.model, tiny.tok, tiny.task, tiny.lease, results, 0)
    assert verdict.outcome == "hard"
    assert verdict.check not in ("structure", "staleness"), verdict.reason
