import pytest
import torch

from trainer.advantages import group_advantages


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


def test_bad_shapes_refused():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.ones(1, 2), "mean")  # type: ignore[arg-type]
