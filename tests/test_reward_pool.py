"""Reward pools: least-loaded dispatch, backlog autoscaling within bounds, safe shrinking."""

import pytest

from ddpo.pools import PoolSize, parse_pool_sizes
from learner.reward_pool import RewardPool


class Fake:
    """Stand-ins for actors and their call refs."""

    def __init__(self):
        self.made, self.killed, self.calls = [], [], []

    def make(self):
        actor = f"actor{len(self.made)}"
        self.made.append(actor)
        return actor

    def call(self, actor, reward_input):
        ref = object()
        self.calls.append((actor, reward_input, ref))
        return ref


def pool_of(size, **kw):
    fake = Fake()
    return RewardPool("r", size, fake.make, fake.call, fake.killed.append, **kw), fake


def test_least_loaded_dispatch_and_done():
    pool, fake = pool_of(PoolSize(start=3, min=1, max=3))
    refs = [pool.score(i) for i in range(6)]
    assert [a for a, _, _ in fake.calls] == ["actor0", "actor1", "actor2"] * 2
    assert pool.backlog == 6
    for ref in refs[:3]:
        pool.done(ref)
    assert pool.backlog == 3 and pool.scored == 3
    pool.done(object())  # an unknown ref changes nothing
    assert pool.backlog == 3


def test_autoscale_grows_with_backlog_up_to_max_and_shrinks_when_idle():
    pool, fake = pool_of(PoolSize(start=1, min=1, max=3), grow_at=2.0, shrink_after=3)
    refs = [pool.score(i) for i in range(7)]  # backlog 7 on 1 actor
    assert pool.autoscale() == 2 and pool.autoscale() == 3  # 3.5 then 2.33 per actor > 2
    assert pool.autoscale() == 3  # at max
    for ref in refs:
        pool.done(ref)
    sizes = [pool.autoscale() for _ in range(9)]
    assert sizes == [3, 3, 2, 2, 2, 1, 1, 1, 1]  # one step down per 3 idle checks, to min
    assert len(fake.killed) == 2


def test_shrinking_never_removes_a_busy_actor():
    pool, fake = pool_of(PoolSize(start=3, min=1, max=3))
    busy = [pool.score(i) for i in range(3)]  # one call on each actor
    pool.done(busy[0])  # actor0 is idle now
    assert pool.resize(1) == 2  # only the idle actor can go: no batch is lost
    assert fake.killed == ["actor0"]
    for ref in busy[1:]:
        pool.done(ref)
    assert pool.backlog == 0 and pool.scored == 3
    assert pool.resize(1) == 1


def test_resize_is_bounded():
    pool, _ = pool_of(PoolSize(start=2, min=2, max=4))
    assert pool.resize(10) == 4 and pool.resize(0) == 2


def test_parse_pool_sizes():
    assert parse_pool_sizes(("aesthetic=4",), ()) == {"aesthetic": PoolSize(4, 4, 4)}
    assert parse_pool_sizes(("aesthetic=4",), ("aesthetic=2:8",)) == {
        "aesthetic": PoolSize(4, 2, 8)
    }
    assert parse_pool_sizes((), ("alignment=1:3",)) == {"alignment": PoolSize(1, 1, 3)}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_pool_sizes(("aesthetic",), ())
    with pytest.raises(ValueError, match="MIN:MAX"):
        parse_pool_sizes((), ("aesthetic=3",))
    with pytest.raises(ValueError, match="min <= start <= max"):
        parse_pool_sizes(("aesthetic=9",), ("aesthetic=1:4",))
