"""Each variant of the loss against values worked out by hand on tiny tensors."""

import math

import pytest
import torch

from trainer.loss import LossConfig, batch_normaliser, policy_loss

LN = math.log


def _run(ratios, adv, mask=None, **cfg):
    """Build logp from ratios against a behaviour logp of log(0.5) everywhere."""
    ratios = torch.tensor(ratios, dtype=torch.float64)
    behaviour = torch.full_like(ratios, LN(0.5))
    logp = (behaviour + torch.log(ratios)).requires_grad_(True)
    mask = torch.ones_like(ratios) if mask is None else torch.tensor(mask, dtype=torch.float64)
    config = LossConfig(**cfg)
    loss, stats = policy_loss(
        logp,
        behaviour,
        torch.tensor(adv, dtype=torch.float64),
        mask,
        config,
        batch_normaliser(config, mask),
    )
    loss.backward()
    return loss.item(), logp.grad, stats


def test_unclipped_dapo_is_mean_of_ratio_times_advantage():
    loss, grad, _ = _run([[1.1, 0.9], [1.0, 1.05]], [1.0, -2.0])
    # -(1.1*1 + 0.9*1 + 1.0*-2 + 1.05*-2) / 4 tokens
    assert loss == pytest.approx(-(1.1 + 0.9 - 2.0 - 2.1) / 4)
    # d/dlogp of -r*A/4 is -r*A/4
    assert grad[0, 0].item() == pytest.approx(-1.1 / 4)
    assert grad[1, 1].item() == pytest.approx(2.1 / 4)


def test_clip_high_for_positive_advantage_stops_gradient():
    loss, grad, stats = _run([[1.5]], [1.0])
    assert loss == pytest.approx(-1.28)  # clipped at 1 + epsilon_high
    assert grad[0, 0].item() == 0.0
    assert stats["clipped_high_tokens"] == 1


def test_clip_low_for_negative_advantage_stops_gradient():
    loss, grad, stats = _run([[0.5]], [-1.0])
    # min(0.5*-1, 0.8*-1) = -0.8 -> loss 0.8, flat in the ratio
    assert loss == pytest.approx(0.8)
    assert grad[0, 0].item() == 0.0
    assert stats["clipped_low_tokens"] == 1


def test_delta_caps_the_ratio_for_negative_advantages():
    loss, grad, _ = _run([[3.0]], [-1.0], is_cap=0)
    # min(3*-1, 1.28*-1) = -3; max(-3, 4*-1) = -3: under the cap, gradient flows
    assert loss == pytest.approx(3.0) and grad[0, 0].item() == pytest.approx(3.0)
    loss, grad, _ = _run([[6.0]], [-1.0], is_cap=0)
    # min(6*-1, ...) = -6; max(-6, -4) = -4: capped at delta, no gradient
    assert loss == pytest.approx(4.0) and grad[0, 0].item() == 0.0
    loss, _, _ = _run([[6.0]], [-1.0], is_cap=0, delta=0)
    assert loss == pytest.approx(6.0)  # delta 0 disables the cap


def test_trust_band_masks_far_off_policy_tokens():
    loss, grad, stats = _run([[1.0, 5.0]], [1.0], is_cap=4.0)
    # the 5x token is outside [1/4, 4] and masked; the normaliser still counts both tokens
    assert loss == pytest.approx(-1.0 / 2)
    assert grad[0, 1].item() == 0.0
    assert stats["masked_tokens"] == 1


def test_grpo_averages_per_sequence_then_over_sequences():
    ratios = [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    mask = [[1, 1, 1], [1, 0, 0]]
    loss, _, _ = _run(ratios, [1.0, 2.0], mask=mask, loss_type="grpo")
    assert loss == pytest.approx(-(3 / 3 + 2 / 1) / 2)
    loss_dapo, _, _ = _run(ratios, [1.0, 2.0], mask=mask, loss_type="dapo")
    assert loss_dapo == pytest.approx(-(1 + 1 + 1 + 2) / 4)


def test_dr_grpo_divides_by_sequences_times_length_cap():
    loss, _, _ = _run(
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
        [1.0, 2.0],
        mask=[[1, 1, 1], [1, 0, 0]],
        loss_type="dr_grpo",
        max_completion_len=10,
    )
    assert loss == pytest.approx(-(3 * 1 + 1 * 2) / (2 * 10))


def test_gspo_uses_one_length_normalised_ratio_per_sequence():
    # sequence ratio = exp(mean(log 1.1, log 0.9)) = sqrt(0.99)
    loss, grad, _ = _run([[1.1, 0.9]], [1.0], loss_type="gspo", epsilon_low=0.1, epsilon_high=0.1)
    s = math.sqrt(1.1 * 0.9)
    assert loss == pytest.approx(-s)
    # d(-s)/dlogp_t = -s / 2 for each token
    assert grad[0, 0].item() == pytest.approx(-s / 2) and grad[0, 1].item() == pytest.approx(-s / 2)
    loss, grad, _ = _run([[1.5, 1.5]], [1.0], loss_type="gspo", epsilon_low=0.1, epsilon_high=0.1)
    assert loss == pytest.approx(-1.1) and grad.abs().sum().item() == 0.0


def test_kl_k3_and_entropy_terms():
    logp = torch.tensor([[LN(0.5)]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[LN(0.25)]], dtype=torch.float64)
    ent = torch.tensor([[2.0]], dtype=torch.float64)
    config = LossConfig(beta=0.1, entropy_coef=0.01)
    loss, stats = policy_loss(
        logp,
        logp.detach(),
        torch.tensor([0.0], dtype=torch.float64),
        torch.ones(1, 1),
        config,
        1.0,
        ref_logp=ref,
        entropy=ent,
    )
    d = LN(0.25) - LN(0.5)
    kl = math.exp(d) - d - 1  # 0.5 + ln 2 - 1
    assert stats["kl_sum"] == pytest.approx(kl)
    assert loss.item() == pytest.approx(0.1 * kl - 0.01 * 2.0)
    with pytest.raises(ValueError, match="reference"):
        policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 1), LossConfig(beta=0.1), 1.0)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "gspo"])
def test_micro_batches_add_up_to_the_batch(loss_type):
    torch.manual_seed(0)
    behaviour = torch.log(torch.rand(4, 5, dtype=torch.float64) * 0.5 + 0.25)
    logp = behaviour + torch.randn(4, 5, dtype=torch.float64) * 0.3
    mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    ).double()
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)
    config = LossConfig(loss_type=loss_type, max_completion_len=5)
    norm = batch_normaliser(config, mask)
    full, _ = policy_loss(logp, behaviour, adv, mask, config, norm)
    halves = sum(
        policy_loss(logp[s], behaviour[s], adv[s], mask[s], config, norm)[0]
        for s in (slice(0, 2), slice(2, 4))
    )
    assert full.item() == pytest.approx(halves.item())
