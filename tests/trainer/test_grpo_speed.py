"""The trainer's speed-ups change nothing it learns: logits only at completion positions, each
distinct prompt run once per micro-batch (its KV cache copied to the group's samples), and the
fused AdamW, against the computations they replaced."""

import copy
import random

import torch

from toploc.models import load_model
from trainer.config import AlgorithmSection
from trainer.grpo import GRPOTrainer, Sample, TrainGroup
from trainer.local import pool_copy, refresh_copy
from trainer.loss import batch_normaliser, policy_loss

T = 0.7


def _groups() -> list[TrainGroup]:
    """Prompts of different lengths (so the window holds prompt positions of the longer ones),
    completions of different lengths, random tokens and behaviour logprobs off the policy (so
    some ratios clip): any shift of positions changes the loss."""
    rng = random.Random(3)
    groups = []
    for gid, plen in enumerate([2, 6, 4]):
        prompt = [rng.randrange(3, 50) for _ in range(plen)]
        samples = []
        for _ in range(3):
            n = rng.randint(1, 5)
            tokens = [rng.randrange(3, 50) for _ in range(n)]
            samples.append(Sample(prompt, tokens, [rng.uniform(-5, -1) for _ in range(n)], False))
        groups.append(TrainGroup(samples, [1.0, 0.0, 0.5], [1.1, -0.9, -0.2], 0, gid))
    return groups


def _full_logits_loss(model, trainer, groups) -> torch.Tensor:
    """The loss as computed before the window: logits at every position of the padded batch,
    the completion mask over all width - 1 target positions."""
    samples = [s for g in groups for s in g.samples]
    width = max(len(s.prompt_ids) + len(s.tokens) for s in samples)
    ids = torch.zeros((len(samples), width), dtype=torch.long)
    attention = torch.zeros_like(ids)
    mask = torch.zeros((len(samples), width - 1))
    behaviour = torch.zeros_like(mask)
    for i, s in enumerate(samples):
        p, n = len(s.prompt_ids), len(s.tokens)
        ids[i, : p + n] = torch.tensor(s.prompt_ids + s.tokens)
        attention[i, : p + n] = 1
        mask[i, p - 1 : p - 1 + n] = 1
        behaviour[i, p - 1 : p - 1 + n] = torch.tensor(s.behaviour_logprobs)
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1] / T, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    adv = torch.tensor([a for g in groups for a in g.advantages])
    config = trainer.loss_config
    loss, _ = policy_loss(logp, behaviour, adv, mask, config, batch_normaliser(config, mask))
    return loss


def test_window_loss_and_gradients_equal_the_full_logits_computation():
    model, _ = load_model("tiny")
    reference = copy.deepcopy(model).float().train()
    # No clipping, so the gradients after the step are the loss's own; micro-batches of 4 split
    # groups, so the batch-wide window and normaliser are exercised across passes, and a
    # micro-batch holds a prompt shared by several samples (its cache copied, gradients summed
    # back through the copies) beside a prompt of another length.
    algo = AlgorithmSection(lr=1e-3, micro_batch=4, grad_clip=0.0)
    trainer = GRPOTrainer(model, algo, temperature=T, max_new_tokens=5)
    groups = _groups()
    metrics = trainer.step(groups, 0).metrics

    loss = _full_logits_loss(reference, trainer, groups)
    loss.backward()
    loss = float(loss.detach())
    # fp32 on both sides; the tolerance covers summation order across micro-batches.
    assert abs(metrics["policy_loss"] - loss) < 1e-5, (metrics["policy_loss"], loss)
    assert metrics["clip_low_frac"] + metrics["clip_high_frac"] > 0  # the clip is exercised
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name


def test_fused_adamw_makes_the_update_of_the_plain_loop():
    model, _ = load_model("tiny")
    trainer = GRPOTrainer(
        model, AlgorithmSection(lr=1e-2, weight_decay=0.1), temperature=1.0, max_new_tokens=4
    )
    assert trainer.optimizer.param_groups[0]["fused"]
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    twins = [p.detach().clone().requires_grad_() for p in params]
    plain = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1, foreach=False, fused=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(params, twins, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        trainer.optimizer.step()
        plain.step()
    for p, q, s in zip(params, twins, start, strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
        assert (p - s).abs().max() > 1e-3  # three steps of lr 1e-2 moved every weight


def test_the_bare_loop_generates_from_a_pool_dtype_copy_that_follows_each_step():
    """bf16 pools: the bare loop samples from a bf16 copy (as nodes generate) instead of casting
    the fp32 weights in every op under autocast; after a step the copy holds the new weights."""
    model, _ = load_model("tiny")
    trainer = GRPOTrainer(model, AlgorithmSection(lr=1e-2), temperature=1.0, max_new_tokens=5)
    assert pool_copy(model, torch.float32) is model
    policy = pool_copy(model, torch.bfloat16)
    assert policy is not model and next(policy.parameters()).dtype == torch.bfloat16
    trainer.step(_groups(), 0)
    moved = [
        not torch.equal(p.to(torch.bfloat16), q)
        for p, q in zip(model.parameters(), policy.parameters(), strict=True)
    ]
    assert any(moved)  # the step changed weights the copy does not hold yet
    refresh_copy(policy, model)
    for p, q in zip(model.parameters(), policy.parameters(), strict=True):
        assert torch.equal(p.to(torch.bfloat16), q)
