import random

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from protocol.errors import SwarmError
from trainer.checkpoint import Checkpointer, latest_committed, list_checkpoints
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


def _state(model, opt):
    m, o = get_state_dict(model, opt)
    return {"model": m, "optim": o}


def _save(root, step, model, opt, sched, keep=3, extra=None):
    ckpt = Checkpointer(root, keep)
    return ckpt.finish(ckpt.start(step, step, _state(model, opt), sched, extra))


def test_round_trip_restores_everything(tmp_path):
    model, opt, sched = _model_and_opt()
    _train(model, opt, sched)
    writer = Checkpointer(tmp_path)
    pending = writer.start(3, 3, _state(model, opt), sched, {"ledger_step": 3})
    expected_next = torch.randn(2)  # RNG continues from the state when it was staged
    expected_py = random.random()
    # training goes on while it is written: the checkpoint keeps the staged state
    staged = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, opt, sched, 1)
    writer.finish(pending)

    other, opt2, sched2 = _model_and_opt(seed=1)
    ckpt = latest_committed(tmp_path, committed_step=3)
    assert (ckpt.step, ckpt.version, ckpt.extra) == (3, 3, {"ledger_step": 3})
    state = _state(other, opt2)
    Checkpointer(tmp_path).load(ckpt, state, sched2)
    set_state_dict(other, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for k, v in other.state_dict().items():
        assert torch.equal(staged[k], v)
    assert opt2.state_dict()["state"][0]["step"] == 3 and sched2.last_epoch == 3
    assert torch.equal(torch.randn(2), expected_next) and random.random() == expected_py
    # training on from both copies of step 3 gives identical weights
    again, opt3, sched3 = _model_and_opt(seed=2)
    state = _state(again, opt3)
    Checkpointer(tmp_path).load(ckpt, state, sched3)
    set_state_dict(again, opt3, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for m, o, s in ((other, opt2, sched2), (again, opt3, sched3)):
        torch.manual_seed(5)
        _train(m, o, s, 2)
    for a, b in zip(other.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_orphans_are_deleted_and_old_ones_pruned(tmp_path):
    model, opt, sched = _model_and_opt()
    for step in range(1, 6):
        _save(tmp_path, step, model, opt, sched, keep=3)
    assert [c.step for c in list_checkpoints(tmp_path)] == [3, 4, 5]
    # the ledger committed only step 4: step 5 is an orphan of a crash
    assert latest_committed(tmp_path, 4).step == 4
    assert [c.step for c in list_checkpoints(tmp_path)] == [3, 4]
    # a write the crash interrupted is ignored, then removed
    unfinished = Checkpointer(tmp_path).start(9, 9, _state(model, opt), sched)
    unfinished.future.result()
    assert latest_committed(tmp_path, 4).step == 4 and not unfinished.tmp.exists()
    with pytest.raises(SwarmError, match="inconsistent"):
        latest_committed(tmp_path, 7)
    assert latest_committed(tmp_path / "empty", 0) is None


def test_lease_book_is_deterministic_and_node_specific():
    book = LeaseBook(pool_seed=1, n_prompts=1000)
    a, b = b"a" * 32, b"b" * 32
    plan = book.plan(a, 0, 4)
    assert plan == LeaseBook(1, 1000).plan(a, 0, 4)
    assert plan != book.plan(a, 1, 4) and plan != book.plan(b, 0, 4)
    assert plan != LeaseBook(2, 1000).plan(a, 0, 4)
    assert all(0 <= p < 1000 for p in plan) and len(plan) == 4


def test_returned_prompts_go_out_first():
    book = LeaseBook(pool_seed=1, n_prompts=1000)
    book.return_prompts([7, 8])
    plan = book.plan(b"c" * 32, 0, 3)
    assert plan[:2] == [7, 8]
    assert book.orphan_count == 0
    with pytest.raises(ValueError, match="no training prompts"):
        LeaseBook(1, 0)
