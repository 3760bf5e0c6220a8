"""How much work the coordinator keeps leased (`trainer.leasing.wanted_tasks`), hand-computed.

Work is counted in groups; the comments speak of leases of 4 prompts (4 groups each)."""

from trainer.leasing import MIN_INFORMATIVE, reachable_groups, wanted_tasks

# A pool of batch 8, 4 prompts a lease, a staleness window of 2 batches (16 groups).
POOL = {"batch": 8, "window": 16}


def test_every_group_informative_counts_each_lease_as_four_groups():
    # 2 trainable + 1 pending submission (4) = 6 < 8; with 2 open leases 6 + 8 = 14 < 16:
    # 2 groups more are wanted, so the next lease carries 2 prompts, not 4
    assert wanted_tasks(trainable=2, pending=4, leased=8, informative=1.0, **POOL) == 2
    assert wanted_tasks(trainable=2, pending=4, leased=9, informative=1.0, **POOL) == 1
    # one more open lease: 6 + 12 = 18 >= 16
    assert wanted_tasks(trainable=2, pending=4, leased=12, informative=1.0, **POOL) == 0
    # a batch already done: enough whatever is leased
    assert wanted_tasks(trainable=8, pending=0, leased=0, informative=1.0, **POOL) == 0


def test_mostly_flat_groups_lease_more():
    # 3 of 4 flat, counted at the floor of one half: each group leased brings half a trainable
    # one. 2 + 4 x 1/2 = 4 done; with 20 groups leased, 4 + 10 = 14 < 16: 2 more trainable
    # groups are wanted, which takes 4 prompts
    assert wanted_tasks(trainable=2, pending=4, leased=20, informative=0.25, **POOL) == 4
    assert wanted_tasks(trainable=2, pending=4, leased=22, informative=0.25, **POOL) == 2
    assert wanted_tasks(trainable=2, pending=4, leased=24, informative=0.25, **POOL) == 0
    # three quarters informative: 2 + 3 = 5 done; 5 + 12 x 3/4 = 14, so 2 more trainable
    # groups are wanted: 2 / (3/4) = 2.67, rounded to 3 prompts; 5 + 16 x 3/4 = 17: none
    assert wanted_tasks(trainable=2, pending=4, leased=12, informative=0.75, **POOL) == 3
    assert wanted_tasks(trainable=2, pending=4, leased=16, informative=0.75, **POOL) == 0


def test_the_floor_bounds_leasing_when_nearly_every_group_is_flat():
    # no informative group at all: counted at the floor, 1/2 a group, so 32 leased groups fill
    # the 16-group window (twice what counting every group would lease)
    assert MIN_INFORMATIVE == 0.5
    assert wanted_tasks(trainable=0, pending=0, leased=28, informative=0.0, **POOL) == 4
    assert wanted_tasks(trainable=0, pending=0, leased=32, informative=0.0, **POOL) == 0


def test_a_lease_on_older_weights_reaches_fewer_steps():
    # staleness 2, batch 8: weights as new as the trainer's reach the next 2 steps (16 groups)
    assert reachable_groups(2, 8, lease_version=5, version=5) == 16
    # one version behind: its groups can train only the next step, one batch
    assert reachable_groups(2, 8, lease_version=4, version=5) == 8
    # staleness 4, two behind: 2 steps left
    assert reachable_groups(4, 8, lease_version=3, version=5) == 16
    # staleness 0 still lets the next step take fresh work (as in_flight_groups does)
    assert reachable_groups(0, 8, lease_version=5, version=5) == 8


def test_a_share_just_under_one_does_not_lease_a_group_more_than_a_batch():
    # one version behind the trainer, a batch of 8 reachable, nothing done or leased, and one
    # flat group among the newest 64 (63/64 informative): 8 / (63/64) = 8.13 groups, rounded
    # to 8, not up to a ninth that could only go stale
    assert (
        wanted_tasks(trainable=0, pending=0, leased=0, batch=8, window=8, informative=63 / 64) == 8
    )
    # a share of 7/8 leases 8 / (7/8) = 9.14 -> 9 groups; of 0.8, 10 (8 / 0.8 exactly)
    assert wanted_tasks(trainable=0, pending=0, leased=0, batch=8, window=8, informative=7 / 8) == 9
    assert wanted_tasks(trainable=0, pending=0, leased=0, batch=8, window=8, informative=0.8) == 10
