import torch

from protocol.poolspec import AlgorithmSection
from toploc.models import load_model
from toploc.sampling import token_logprobs
from trainer.grpo import GRPOTrainer, Sample, TrainGroup


def _group(gid, rewards, version=0, prompt=(5, 6, 7)):
    samples = [
        Sample(list(prompt), [10 + i, 11, 2], [-3.0, -3.0, -3.0], False)
        for i in range(len(rewards))
    ]
    return TrainGroup(samples, rewards, version, gid)


def test_trainer_logprobs_match_what_nodes_report():
    model, _ = load_model("tiny")
    trainer = GRPOTrainer(model, AlgorithmSection(), temperature=0.7, max_new_tokens=8)
    samples = [
        Sample([5, 6, 7], [10, 11, 2], [0.0] * 3, False),
        Sample([5], [9, 2], [0.0] * 2, False),
    ]
    batch = trainer._batch(samples)
    with torch.no_grad():
        logp, _ = trainer._logprobs(model, batch, slice(None), need_entropy=False)
        for i, s in enumerate(samples):
            ids = torch.tensor([s.prompt_ids + s.tokens])
            logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1 : -1]
            expected = token_logprobs(logits, torch.tensor(s.tokens), 0.7)
            got = logp[i][batch["mask"][i] > 0]
            assert torch.allclose(got, expected, atol=1e-5)


def test_step_drops_flat_groups_and_updates_weights():
    model, _ = load_model("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = GRPOTrainer(
        model, AlgorithmSection(lr=1e-3, micro_batch=3, is_cap=0), temperature=1.0, max_new_tokens=8
    )
    result = trainer.step([_group(1, [1.0, 0.0, 0.5, 0.0]), _group(2, [1.0] * 4, version=0)], 2)
    assert result.trained == [1] and result.dropped == {2: "zero reward variance"}
    m = result.metrics
    assert m["frac_reward_zero_std"] == 0.5 and m["staleness_max"] == 2.0
    assert m["tokens"] == 12 and m["grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_step_with_only_flat_groups_changes_nothing():
    model, _ = load_model("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = GRPOTrainer(model, AlgorithmSection(), temperature=1.0, max_new_tokens=8)
    result = trainer.step([_group(1, [0.5] * 4)], 0)
    assert result.trained == [] and result.metrics["skipped"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_raising_the_advantaged_sample():
    """One step must make the high-reward completion more likely than before."""
    model, _ = load_model("tiny")
    trainer = GRPOTrainer(
        model, AlgorithmSection(lr=1e-2, is_cap=0), temperature=1.0, max_new_tokens=8
    )
    group = _group(1, [1.0, 0.0, 0.0, 0.0])
    batch = trainer._batch(group.samples)
    with torch.no_grad():
        before, _ = trainer._logprobs(model, batch, slice(None), need_entropy=False)
    trainer.step([group], 0)
    with torch.no_grad():
        after, _ = trainer._logprobs(model, batch, slice(None), need_entropy=False)
    m = batch["mask"]
    gain = ((after - before) * m).sum(1)
    assert gain[0] > 0 and gain[0] > gain[1:].max()
