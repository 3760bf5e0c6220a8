import pytest
import torch

from trainer.advantages import batch_scaled_advantages, group_advantages


def test_group_scaling_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    adv, keep = group_advantages(rewards, "group")
    # group 0: mean 0.5, unbiased std sqrt(1/3) = 0.57735
    expected = 0.5 / (0.57735027 + 1e-4)
    assert torch.allclose(
        adv[0], torch.tensor([expected, -expected, -expected, expected]), atol=1e-5
    )
    assert torch.equal(adv[1], torch.zeros(4))
    assert keep.tolist() == [True, False]


def test_none_and_batch_scaling():
    rewards = torch.tensor([[3.0, 1.0], [0.0, 0.0]])
    adv, _ = group_advantages(rewards, "none")
    assert adv.tolist() == [[1.0, -1.0], [0.0, 0.0]]
    adv_b, _ = group_advantages(rewards, "batch")
    batch_std = torch.tensor([3.0, 1.0, 0.0, 0.0]).std()
    assert torch.allclose(adv_b[0], torch.tensor([1.0, -1.0]) / (batch_std + 1e-4))


def test_batch_scaling_of_groups_of_different_sizes_by_hand():
    # rewards 1,0 | 1,0,0,0: mean 1/3, squared deviations 2 x 4/9 + 4 x 1/9 = 4/3, unbiased
    # std sqrt(4/15) = 0.51640; group means 0.5 and 0.25
    a, b = batch_scaled_advantages([[1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    scale = 0.5163978 + 1e-4
    assert torch.allclose(a, torch.tensor([0.5, -0.5]) / scale, atol=1e-6)
    assert torch.allclose(b, torch.tensor([0.75, -0.25, -0.25, -0.25]) / scale, atol=1e-6)
    # equal sizes: what group_advantages(..., "batch") gives
    same = batch_scaled_advantages([[3.0, 1.0], [0.0, 0.0]])
    adv_b, _ = group_advantages(torch.tensor([[3.0, 1.0], [0.0, 0.0]]), "batch")
    assert all(torch.allclose(x, y) for x, y in zip(same, adv_b, strict=True))


def test_bad_shapes_refused():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.ones(1, 2), "mean")  # type: ignore[arg-type]
