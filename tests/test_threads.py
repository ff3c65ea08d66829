"""Thread settings: the governor picks the faster thread count from step times, follows a change
of load, honours the user's fixed count, and Ray actors receive the driver's thread settings."""

from collections import Counter

import pytest

from ddpo.threads import ThreadGovernor, actor_env, fixed_threads, role_threads


class FakeMachine:
    """A clock that advances by the cost of the thread count last set."""

    def __init__(self, cost: dict[int, float]):
        self.cost, self.now, self.threads = cost, 0.0, 0

    def set_threads(self, n: int) -> None:
        self.threads = n

    def clock(self) -> float:
        return self.now

    def run(self, governor: ThreadGovernor, steps: int) -> Counter:
        used: Counter = Counter()
        for _ in range(steps):
            with governor.step("denoise") as n:
                assert n == self.threads
                self.now += self.cost[n]
            used[n] += 1
        return used


def make(machine: FakeMachine, **kw) -> ThreadGovernor:
    return ThreadGovernor(2, clock=machine.clock, set_threads=machine.set_threads, **kw)


def test_quiet_machine_uses_all_threads_and_probes_one_rarely():
    machine = FakeMachine({2: 1.0, 1: 1.4})
    governor = make(machine, probe_every=32)
    used = machine.run(governor, 400)
    # 2 warm-up + 2 measured steps of one thread, then a probe every 32 steps.
    assert used[1] <= 2 + 400 // 32 + 1
    assert used[2] >= 400 - used[1]


def test_follows_a_change_of_load_both_ways():
    machine = FakeMachine({2: 1.0, 1: 1.4})
    governor = make(machine, probe_every=16, max_probe_every=64)
    machine.run(governor, 50)
    machine.cost = {2: 20.0, 1: 1.5}  # another process takes a core: two threads collapse
    loaded = machine.run(governor, 300)
    # Switches after a few slow steps, then probes two threads ever more rarely (backs off).
    assert loaded[2] <= 3 + 300 // 16
    recent = machine.run(governor, 128)
    assert recent[2] <= 128 // 64 + 1
    machine.cost = {2: 1.0, 1: 1.4}  # the load goes away: back to two after the next probe
    machine.run(governor, 130)
    assert machine.run(governor, 100)[2] >= 90


def test_fixed_counts_are_not_adapted(monkeypatch):
    machine = FakeMachine({2: 5.0, 1: 1.0})
    governor = make(machine, adaptive=False)
    assert machine.run(governor, 20) == Counter({2: 20})
    assert governor.share() == {"threads/2": 1.0}
    # Decided in the driver's process, from the user's environment.
    monkeypatch.setenv("DDPO_THREADS", "3")
    assert role_threads(2) == (3, False)
    monkeypatch.setenv("DDPO_THREADS", "fixed")  # the driver's split, not adapted
    assert role_threads(2) == (2, False) and fixed_threads() is None
    monkeypatch.setenv("DDPO_THREADS", "auto")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert fixed_threads() is None and role_threads(2) == (2, True)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert role_threads(2) == (1, False)
    monkeypatch.setenv("DDPO_THREADS", "two")
    with pytest.raises(ValueError, match="DDPO_THREADS='two'"):
        fixed_threads()


def test_actor_env_carries_only_what_is_set(monkeypatch):
    for name in ("DDPO_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    assert actor_env() == {}
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("UNRELATED", "x")
    assert actor_env() == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_ray_actors_get_the_drivers_thread_settings(ray_instance, monkeypatch):
    """Values the Ray instance's workers could not have inherited (set after it started)."""
    from learner.fleet import role_options
    from learner.wiring import OnRay

    class EnvProbe:  # defined here so that Ray ships it by value to the worker
        def read(self, names: list[str]) -> dict:
            import os

            return {n: os.environ.get(n) for n in names}

    monkeypatch.setenv("DDPO_THREADS", "1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    wiring = OnRay(None, min_cpus=1, resources={})
    actor = wiring.create(EnvProbe, options=role_options("sampler", gpu=False))
    seen = wiring.get(wiring.call(actor, "read", ["DDPO_THREADS", "OMP_WAIT_POLICY"]))
    assert seen == {"DDPO_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}
    wiring.kill(actor)
