"""Actors that cannot start: what the driver says while it waits, and when it stops (no Ray: the
cluster is given; tests/test_job_submission.py runs it against a real head)."""

from __future__ import annotations

import logging

import pytest

from learner import pending
from learner.errors import ActorsPending
from learner.fleet import role_options
from learner.pending import ClusterView, fixes, reason, report, stop_message

SAMPLER = {"CPU": 1, "sampler": 0.001}
REWARD = {"CPU": 1, "reward_jpeg_compressibility": 0.001}
ROLES = {"sampler": 1.0, "learner": 1.0, "reward_jpeg_compressibility": 1.0}


def head(cpus: float, free_cpus: float, autoscaling: bool = False, **extra: float) -> ClusterView:
    """One node (the deploy/README head), some of its CPUs taken."""
    total = {"CPU": cpus, **ROLES, **extra}
    return ClusterView([total], total, {**total, "CPU": free_cpus}, autoscaling)


def test_the_sync_learner_asks_for_no_cpu_of_its_own():
    # The documented 2-core head holds a sampler, a reward actor and the sync learner.
    assert role_options("learner", gpu=False, takes_turns=True)["num_cpus"] == 0
    assert role_options("learner", gpu=False)["num_cpus"] == 1  # async: beside the samplers
    assert role_options("sampler", gpu=False)["num_cpus"] == 1


def test_reason_tells_taken_from_missing():
    cluster = head(cpus=2, free_cpus=0)
    assert reason({"CPU": 1, "learner": 0.001}, cluster) == "its CPU is taken"
    assert reason({"CPU": 1, "lerner": 0.001}, cluster) == "no node offers lerner"
    assert reason({"CPU": 0, "GPU": 1, "learner": 0.001}, cluster) == "no node offers GPU"
    two = ClusterView([{"CPU": 1}, {"learner": 1}], {"CPU": 1, "learner": 1}, {}, False)
    assert reason({"CPU": 1, "learner": 0.001}, two) == "no single node offers all of it"


def test_fixes_name_the_flag_and_its_value():
    # A 2-CPU head running a sampler and a reward actor; an async learner asks for a third.
    cpu = fixes({"learner": {"CPU": 1, "learner": 0.001}}, head(cpus=2, free_cpus=0))
    assert "ray start --head --num-cpus=3" in cpu and "ray.init(num_cpus=3)" in cpu
    role = fixes({"learner": {"CPU": 1, "lerner": 0.001}}, head(cpus=4, free_cpus=4))
    assert "add a node that offers lerner" in role and "--resources='{\"lerner\": 1}'" in role
    assert "--num-cpus" not in role  # the CPU is there
    gpu = fixes({"learner": {"GPU": 1, "learner": 0.001}}, head(cpus=2, free_cpus=2))
    assert "--num-gpus=1" in gpu and "--device cpu" in gpu


def test_report_says_who_waits_for_what_and_what_comes_next():
    needs = {"learner": {"CPU": 1, "learner": 0.001}}
    text = report(needs, ["sampler 0"], 3, head(cpus=2, free_cpus=0), 30, 300)
    assert text.splitlines() == [
        "2 of 3 actors not started after 30s:",
        "  learner asks for {CPU: 1, learner: 0.001}: its CPU is taken",
        "  sampler 0 is starting on its node (loading its model)",
        "  the cluster has CPU 2 (0 free), learner 1 (1 free)",
        "  no autoscaler can add a node to this cluster; unless other work frees room, the run "
        "stops at 300s (--pending-timeout); to fix: start Ray with 3 logical CPUs (ray start "
        "--head --num-cpus=3, or ray.init(num_cpus=3); more than the cores is fine), or run "
        "fewer actors (--num-samplers, --reward-workers)",
    ]
    scaling = report(needs, [], 3, head(cpus=2, free_cpus=0, autoscaling=True), 30, None)
    assert "an autoscaler may still add a node" in scaling and "stops" not in scaling

    line = stop_message(needs, head(cpus=2, free_cpus=0), 300)
    assert "\n" not in line
    assert line.startswith("1 actor could not start in 300s (learner asks for {CPU: 1, learner")
    assert "--num-cpus=3" in line


class FakeRay:
    """`ray.wait` that never sees an actor start, on a fake clock that ends at `until`."""

    def __init__(self, monkeypatch):
        self.now, self.until = 0.0, 1000.0
        monkeypatch.setattr(pending.time, "monotonic", lambda: self.now)

    def wait(self, refs, num_returns, timeout):
        if self.now >= self.until:
            raise TimeoutError("still waiting")
        self.now += timeout
        return [], refs


class Handle:
    def __init__(self, has_worker: bool):
        self.has_worker = has_worker
        self.__ray_ready__ = self  # handle.__ray_ready__.remote() -> a ref

    def remote(self):
        return self


@pytest.fixture
def fake_ray(monkeypatch):
    monkeypatch.setattr(pending, "has_worker", lambda handle: handle.has_worker)
    return FakeRay(monkeypatch)


def use_cluster(monkeypatch, cluster: ClusterView) -> None:
    monkeypatch.setattr(ClusterView, "read", classmethod(lambda cls, ray, joined: cluster))


def test_stops_after_the_bound_when_nothing_can_add_a_node(fake_ray, monkeypatch, caplog):
    use_cluster(monkeypatch, head(cpus=2, free_cpus=0))
    actors = {"sampler 0": (Handle(True), SAMPLER), "reward actor 0": (Handle(False), REWARD)}
    with caplog.at_level(logging.WARNING), pytest.raises(ActorsPending, match="--num-cpus=3"):
        pending.wait_started(fake_ray, actors, report_s=30, timeout_s=75, joined=True)
    assert fake_ray.now == 75  # reports at 30 and 60, stops at the bound
    assert [r.getMessage().splitlines()[0] for r in caplog.records] == [
        "2 of 2 actors not started after 30s:",
        "2 of 2 actors not started after 60s:",
    ]


def test_waits_for_an_autoscaler_and_for_actors_that_are_only_slow(fake_ray, monkeypatch):
    use_cluster(monkeypatch, head(cpus=2, free_cpus=0, autoscaling=True))
    actors = {"reward actor 0": (Handle(False), REWARD)}
    with pytest.raises(TimeoutError, match="still waiting"):  # waited past the bound
        pending.wait_started(fake_ray, actors, report_s=30, timeout_s=75, joined=True)

    use_cluster(monkeypatch, head(cpus=2, free_cpus=0))  # no autoscaler, but it has a worker
    actors = {"sampler 0": (Handle(True), SAMPLER)}
    fake_ray.now = 0.0
    with pytest.raises(TimeoutError, match="still waiting"):
        pending.wait_started(fake_ray, actors, report_s=30, timeout_s=75, joined=False)
