import random

import pytest
import torch

from protocol.errors import SwarmError
from trainer.checkpoint import latest_committed, list_checkpoints, load_checkpoint, save_checkpoint
from trainer.leases import LeaseBook


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def _train(model, opt, sched, steps=3):
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()


def test_round_trip_restores_everything(tmp_path):
    model, opt, sched = _model_and_opt()
    _train(model, opt, sched)
    save_checkpoint(tmp_path, 3, 3, model, opt, sched, extra={"ledger_step": 3})
    expected_next = torch.randn(2)  # RNG continues from the saved state
    expected_py = random.random()

    other, opt2, sched2 = _model_and_opt(seed=1)
    ckpt = latest_committed(tmp_path, committed_step=3)
    assert (ckpt.step, ckpt.version, ckpt.extra) == (3, 3, {"ledger_step": 3})
    load_checkpoint(ckpt, other, opt2, sched2)
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"][0]["step"] == 3
    assert torch.equal(torch.randn(2), expected_next) and random.random() == expected_py
    # training on from both gives identical weights
    torch.manual_seed(5)
    _train(model, opt, sched, 2)
    torch.manual_seed(5)
    _train(other, opt2, sched2, 2)
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_orphans_are_deleted_and_old_ones_pruned(tmp_path):
    model, opt, sched = _model_and_opt()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, step, model, opt, sched, keep=3)
    assert [c.step for c in list_checkpoints(tmp_path)] == [3, 4, 5]
    # the ledger committed only step 4: step 5 is an orphan of a crash
    assert latest_committed(tmp_path, 4).step == 4
    assert [c.step for c in list_checkpoints(tmp_path)] == [3, 4]
    (tmp_path / ".step-00000009.abc").mkdir()  # a half-written temporary folder is ignored
    assert latest_committed(tmp_path, 4).step == 4
    with pytest.raises(SwarmError, match="inconsistent"):
        latest_committed(tmp_path, 7)
    assert latest_committed(tmp_path / "empty", 0) is None


def test_lease_book_is_deterministic_and_node_specific():
    book = LeaseBook(pool_seed=1, n_prompts=1000)
    a, b = b"a" * 32, b"b" * 32
    plan = book.plan(a, 0, 4, now=0.0)
    assert plan == LeaseBook(1, 1000).plan(a, 0, 4, now=0.0)
    assert plan != book.plan(a, 1, 4, now=0.0) and plan != book.plan(b, 0, 4, now=0.0)
    assert plan != LeaseBook(2, 1000).plan(a, 0, 4, now=0.0)
    assert all(0 <= p < 1000 for p in plan) and len(plan) == 4


def test_returned_prompts_go_out_first():
    book = LeaseBook(pool_seed=1, n_prompts=1000)
    book.return_prompts([7, 8])
    plan = book.plan(b"c" * 32, 0, 3, now=0.0)
    assert plan[:2] == [7, 8]
    assert book.orphan_count == 0
    with pytest.raises(ValueError, match="no training prompts"):
        LeaseBook(1, 0)
