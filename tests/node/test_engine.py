"""The hf engine: seeded, batch-size independent rollouts that pass the coordinator's checks."""

import pytest

from node.engine import HFEngine
from toploc.models import model_dir


def tokens(results):
    return [c.tokens for r in results for c in r.completions]


def test_hf_engine_rollouts_pass_validation_whatever_the_batch(tiny, validate):
    engine = HFEngine(dtype="float32", max_batch=16)
    engine.load(model_dir("tiny"), 0)
    results = engine.generate(tiny.lease)
    assert [len(r.completions) for r in results] == [4, 4, 4]
    assert all(
        c.proofs and len(c.logprobs) == len(c.tokens) for r in results for c in r.completions
    )
    verdict = validate(tiny.model, tiny.tok, tiny.task, tiny.lease, results, 0)
    assert verdict.outcome == "accept", verdict.reason

    # the same lease split into other batches samples the same tokens: seeds, not batch
    # neighbours, decide each sample, so any node's batch size gives the answer validators expect
    small = HFEngine(dtype="float32", max_batch=5)
    small.load(model_dir("tiny"), 0)
    assert tokens(small.generate(tiny.lease)) == tokens(results)
    assert len(set(map(tuple, tokens(results)))) > 1, "different seeds must sample differently"


def test_hf_engine_refuses_to_generate_before_weights_are_loaded(tiny):
    with pytest.raises(RuntimeError, match="no weights"):
        HFEngine().generate(tiny.lease)
