"""How much work the coordinator keeps leased (`trainer.leasing.enough_work`), hand-computed."""

from trainer.leasing import MIN_INFORMATIVE, enough_work

# A pool of batch 8, 4 prompts a lease, a staleness window of 2 batches (16 groups).
POOL = {"per_lease": 4, "batch": 8, "window": 16}


def test_every_group_informative_counts_each_lease_as_four_groups():
    # 2 trainable + 1 pending submission (4) = 6 < 8; with 2 open leases 6 + 8 = 14 < 16
    assert not enough_work(trainable=2, pending=1, leased=2, informative=1.0, **POOL)
    # one more open lease: 6 + 12 = 18 >= 16
    assert enough_work(trainable=2, pending=1, leased=3, informative=1.0, **POOL)
    # a batch already done: enough whatever is leased
    assert enough_work(trainable=8, pending=0, leased=0, informative=1.0, **POOL)


def test_mostly_flat_groups_lease_more():
    # a quarter informative: each lease brings 1 trainable group. 2 + 1 = 3 < 8, and
    # 3 + 12 x 1 = 15 < 16: twelve open leases are not yet enough (three were, counted whole)
    assert not enough_work(trainable=2, pending=1, leased=12, informative=0.25, **POOL)
    assert enough_work(trainable=2, pending=1, leased=13, informative=0.25, **POOL)


def test_the_floor_bounds_leasing_when_nearly_every_group_is_flat():
    # no informative group at all: counted at the floor, 4 x 0.125 = 0.5 a lease, so 32 open
    # leases fill the 16-group window rather than leasing without end
    assert MIN_INFORMATIVE == 0.125
    assert not enough_work(trainable=0, pending=0, leased=31, informative=0.0, **POOL)
    assert enough_work(trainable=0, pending=0, leased=32, informative=0.0, **POOL)
