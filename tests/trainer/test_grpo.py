import torch

from toploc.models import load_model
from toploc.sampling import token_logprobs
from trainer.algorithm import FLAT, GroupAlgorithm
from trainer.config import AlgorithmSection
from trainer.grpo import GRPOTrainer, Sample, TrainGroup


def _group(gid, rewards, version=0, prompt=(5, 6, 7)):
    samples = [
        Sample(list(prompt), [10 + i, 11, 2], [-3.0, -3.0, -3.0], False)
        for i in range(len(rewards))
    ]
    advantages = GroupAlgorithm("group").score(rewards).advantages
    return TrainGroup(samples, rewards, advantages, version, gid)


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


def test_step_trains_on_the_stored_advantages_and_updates_weights():
    model, _ = load_model("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = GRPOTrainer(
        model, AlgorithmSection(lr=1e-3, micro_batch=3, is_cap=0), temperature=1.0, max_new_tokens=8
    )
    result = trainer.step([_group(1, [1.0, 0.0, 0.5, 0.0]), _group(2, [0.0, 1.0, 0.0, 0.0])], 2)
    assert result.trained == [1, 2]
    m = result.metrics
    assert m["staleness_max"] == 2.0 and m["groups"] == 2.0
    assert m["tokens"] == 24 and m["grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_step_takes_groups_of_different_sizes():
    # `sampling.max_group_size` leases some prompts more samples than others
    model, _ = load_model("tiny")
    trainer = GRPOTrainer(model, AlgorithmSection(lr=1e-3, micro_batch=4), 1.0, 8)
    result = trainer.step([_group(1, [1.0, 0.0]), _group(2, [0.0, 1.0, 0.0, 0.0, 0.0])], 0)
    assert result.trained == [1, 2]
    # the mean over the 7 samples, not over the two groups' means (0.5 and 0.2)
    assert abs(result.metrics["reward_mean"] - 2 / 7) < 1e-6 and result.metrics["tokens"] == 21
    batched = GroupAlgorithm("batch").batch([_group(1, [1.0, 0.0]), _group(2, [0.0, 1.0, 0.0])])
    assert [len(g.advantages) for g in batched] == [2, 3]


def test_algorithm_scores_once_and_drops_flat_groups():
    algo = GroupAlgorithm("group")
    flat = algo.score([0.5] * 4)
    assert flat.dropped == FLAT and flat.advantages == [0.0] * 4
    # mean 0.375, sample std 0.4787: (1 - 0.375) / (0.4787 + 1e-4) = 1.3053
    scored = algo.score([1.0, 0.0, 0.5, 0.0])
    assert scored.dropped is None and abs(scored.advantages[0] - 1.3053) < 1e-3
    # Dr. GRPO: centred only
    assert GroupAlgorithm("none").score([1.0, 0.0]).advantages == [0.5, -0.5]
    # batch scaling: stored centred, divided by the batch's reward std when batched
    batch = GroupAlgorithm("batch")
    g1 = TrainGroup([], [1.0, 0.0], batch.score([1.0, 0.0]).advantages, 0, 1)
    g2 = TrainGroup([], [1.0, 1.0], [0.0, 0.0], 0, 2)
    assert g1.advantages == [0.5, -0.5]
    scaled = batch.batch([g1, g2])
    std = torch.tensor([1.0, 0.0, 1.0, 1.0]).std().item()  # 0.5
    assert abs(scaled[0].advantages[0] - 0.5 / (std + 1e-4)) < 1e-4
    assert GroupAlgorithm("group").batch([g1]) == [g1]


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


def _own_logprobs(trainer, group):
    """The group with the trainer's own logprobs as behaviour: what an fp32 node reports."""
    batch = trainer._batch(group.samples)
    with torch.no_grad():
        logp, _ = trainer._logprobs(trainer.model, batch, slice(None), need_entropy=False)
    samples = [
        Sample(s.prompt_ids, s.tokens, logp[i][batch["mask"][i] > 0].tolist(), s.truncated)
        for i, s in enumerate(group.samples)
    ]
    return TrainGroup(samples, group.rewards, group.advantages, group.weight_version, 1)


def test_decoupled_matches_behaviour_on_policy_and_mismatch_is_zero():
    """With fresh samples and exact logprobs the weights are 1 and nothing is masked, so both
    off-policy modes make the same update; the trainer-node mismatch is ~0."""
    after = []
    for mode in ("behaviour", "decoupled"):
        model, _ = load_model("tiny")
        algo = AlgorithmSection(lr=1e-2, is_cap=0, off_policy=mode)
        trainer = GRPOTrainer(model, algo, temperature=1.0, max_new_tokens=8)
        group = _own_logprobs(trainer, _group(1, [1.0, 0.0, 0.0, 0.0], version=3))
        m = trainer.step([group], 3).metrics
        assert m["mismatch_kl"] < 1e-9 and m["icepop_masked_frac"] == 0.0
        assert abs(m["tis_weight_mean"] - 1.0) < 1e-5
        after.append(model.state_dict())
    for k, v in after[0].items():
        assert torch.allclose(v, after[1][k], atol=1e-6), k


def test_mismatch_kl_counts_only_fresh_groups():
    model, _ = load_model("tiny")
    trainer = GRPOTrainer(
        model, AlgorithmSection(is_cap=0, off_policy="decoupled"), 1.0, max_new_tokens=8
    )
    fresh, stale = _group(1, [1.0, 0.0], version=2), _group(2, [0.0, 1.0], version=0)
    batch = trainer._batch(fresh.samples)
    with torch.no_grad():
        logp, _ = trainer._logprobs(model, batch, slice(None), need_entropy=False)
    d = logp[batch["mask"] > 0] - (-3.0)  # nodes reported -3.0 for every token
    expected = float((torch.exp(d) - d - 1).mean())  # k3, over the fresh group's 6 tokens
    m = trainer.step([fresh, stale], 2).metrics
    assert abs(m["mismatch_kl"] - expected) < 1e-5 and expected > 0.1
    assert m["staleness_max"] == 2.0
    assert 0.0 <= m["icepop_masked_frac"] <= 1.0
    assert "mismatch_kl" not in trainer.step([stale], 2).metrics  # no fresh group, no value
