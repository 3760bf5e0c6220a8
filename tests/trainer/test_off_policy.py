"""Truncated importance weights, the IcePop band, the trainer-node mismatch and the decoupled
objective, against values worked out by hand."""

import math

import pytest
import torch

from trainer.loss import LossConfig, LossConfigError, batch_normaliser, policy_loss
from trainer.off_policy import icepop_band, mismatch_kl_sum, truncated_is_weights

LN = math.log


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_tis_weights_are_the_prox_behaviour_ratio_truncated_at_the_cap():
    prox = _t([[LN(0.3), LN(0.1), LN(0.2)]]).requires_grad_(True)
    behaviour = _t([[LN(0.1), LN(0.2), LN(0.2)]])
    w = truncated_is_weights(prox, behaviour, cap=2.0)
    # 0.3/0.1 = 3 -> truncated to 2; 0.1/0.2 = 0.5; equal -> 1
    assert w[0].tolist() == pytest.approx([2.0, 0.5, 1.0])
    assert not w.requires_grad  # a weight, not a path for the gradient
    assert truncated_is_weights(prox, behaviour, cap=0.0)[0].tolist() == pytest.approx(
        [3.0, 0.5, 1.0]
    )


def test_icepop_band_keeps_its_edges_and_masks_just_outside():
    # behaviour logprob 0, so prox - behaviour is the prox logprob itself, exactly
    below, above = math.nextafter(LN(0.5), -math.inf), math.nextafter(LN(5.0), math.inf)
    prox = _t([[LN(0.5), below, LN(5.0), above, 0.0]])
    band = icepop_band(prox, torch.zeros_like(prox), low=0.5, high=5.0)
    assert band.tolist() == [[1.0, 0.0, 1.0, 0.0, 1.0]]
    # 0 turns an edge off
    assert icepop_band(prox, torch.zeros_like(prox), 0.0, 5.0).tolist() == [[1, 1, 1, 0, 1]]
    assert icepop_band(prox, torch.zeros_like(prox), 0.5, 0.0).tolist() == [[1, 0, 1, 1, 1]]


def test_mismatch_kl_is_zero_for_equal_logprobs_and_k3_otherwise():
    node = _t([[LN(0.5), LN(0.9), LN(0.2)]])
    assert mismatch_kl_sum(node, node.clone(), torch.ones_like(node)) == 0.0
    trainer = _t([[LN(0.25), LN(0.1), LN(0.2)]])
    # token 0: d = ln(0.25 / 0.5) = -ln 2 -> 0.5 + ln 2 - 1; token 1 is masked; token 2: d = 0
    mask = _t([[1, 0, 1]])
    assert mismatch_kl_sum(node, trainer, mask) == pytest.approx(0.5 + LN(2) - 1)


def _decoupled(prox_over_behaviour, ratios, adv, **cfg):
    """Behaviour logprob log(0.1) per token; prox = behaviour * given ratio; theta = prox * r."""
    behaviour = torch.full((1, len(ratios)), LN(0.1), dtype=torch.float64)
    prox = behaviour + torch.log(_t([prox_over_behaviour]))
    logp = (prox + torch.log(_t([ratios]))).requires_grad_(True)
    mask = torch.ones_like(behaviour)
    config = LossConfig(**cfg)
    loss, stats = policy_loss(
        logp,
        behaviour,
        _t([adv]),
        mask,
        config,
        batch_normaliser(config, mask),
        prox_logp=prox,
    )
    loss.backward()
    return loss.item(), logp.grad[0].tolist(), stats


def test_decoupled_objective_by_hand():
    # token 0: w = 1.5, r = 1.1 unclipped   -> -1.5 * 1.1 = -1.65, d/dlogp = -1.65 / 3
    # token 1: w = min(3, 2) = 2, r = 1.5 clipped at 1.28 -> -2 * 1.28 = -2.56, no gradient
    # token 2: pi_prox / pi_behaviour = 6 > 5: masked (the normaliser still counts it)
    loss, grad, stats = _decoupled([1.5, 3.0, 6.0], [1.1, 1.5, 1.0], 1.0, off_policy="decoupled")
    assert loss == pytest.approx((-1.65 - 2.56) / 3)
    assert grad == pytest.approx([-1.65 / 3, 0.0, 0.0])
    assert stats["icepop_masked_tokens"] == 1 and stats["masked_tokens"] == 1
    assert stats["live_tokens"] == 2 and stats["tis_weight_sum"] == pytest.approx(3.5)
    # the ratio is against prox, so ratio_sum is 1.1 + 1.5 + 1.0
    assert stats["ratio_sum"] == pytest.approx(3.6)


def test_decoupled_negative_advantage_is_weighted_and_delta_capped_against_prox():
    # w = 0.6, r = 0.9 -> min(-0.9, -0.9) = -0.9 -> loss 0.6 * 0.9; r = 5 > delta 4 -> -4 capped
    loss, grad, _ = _decoupled([0.6, 1.0], [0.9, 5.0], -1.0, off_policy="decoupled")
    assert loss == pytest.approx((0.6 * 0.9 + 4.0) / 2)
    assert grad == pytest.approx([0.6 * 0.9 / 2, 0.0])


def test_behaviour_mode_clips_the_stale_token_that_decoupled_learns_from():
    # pi_theta / pi_behaviour = 1.5 * 1.1 = 1.65 > 1.28: clipped, no gradient under behaviour
    _, grad, stats = _decoupled([1.5], [1.1], 1.0, off_policy="behaviour", is_cap=0)
    assert grad == [0.0] and stats["clipped_high_tokens"] == 1
    assert stats["tis_weight_sum"] == 1.0 and stats["icepop_masked_tokens"] == 0
    _, grad, _ = _decoupled([1.5], [1.1], 1.0, off_policy="decoupled")
    assert grad == pytest.approx([-1.65])


def test_decoupled_needs_prox_and_bad_settings_are_refused():
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="proximal"):
        policy_loss(x, x, torch.ones(1), x + 1, LossConfig(off_policy="decoupled"), 1.0)
    with pytest.raises(LossConfigError, match="below"):
        LossConfig(icepop_low=5.0, icepop_high=2.0)
    with pytest.raises(LossConfigError, match="tis_cap"):
        LossConfig(tis_cap=-1.0)
    with pytest.raises(LossConfigError, match="icepop_low"):
        LossConfig(icepop_low=float("nan"))
    with pytest.raises(LossConfigError, match="off_policy"):
        LossConfig(off_policy="stale")
