"""A sampler lost mid-run restarts, gets the newest weights before it samples again, and the
batch it lost is sampled again; the run completes with every epoch full."""

import json

import numpy as np
import pytest


def kill_sampler_in_a_call(monkeypatch, run_dir, after_epochs):
    """Kill sampler 0 (Ray restarts it) just after the driver starts a batch on it, once
    `after_epochs` epochs are in metrics.jsonl: the call is in flight, so its batch is lost
    whatever the machine's speed. Returns the list the kill is recorded in."""
    import ray

    from learner.fleet import Fleet

    original, killed = Fleet.call_sampler, []
    metrics = run_dir / "metrics.jsonl"

    def call_then_kill(self, i, *args, **kwargs):
        refs = original(self, i, *args, **kwargs)
        done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        if i == 0 and not killed and done >= after_epochs:
            ray.kill(self.samplers[0], no_restart=False)
            killed.append(done)
        return refs

    monkeypatch.setattr(Fleet, "call_sampler", call_then_kill)
    return killed


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_killed_sampler_restarts_with_newest_weights(ray_instance, small_config, mode, monkeypatch):
    from ddpo.config import SampleConfig
    from learner.driver import Driver

    config = small_config(
        system={"mode": mode},
        run={"epochs": 3},
        sample=SampleConfig(num_steps=8, batch_size=8, num_batches_per_epoch=2),
    )
    driver = Driver(config)
    killed = kill_sampler_in_a_call(monkeypatch, driver.run_dir, after_epochs=1)
    history = driver.run()
    assert killed == [1]
    assert len(history) == config.run.epochs and all(h["samples"] == 16 for h in history)
    assert [h["policy_version"] for h in history] == list(range(config.run.epochs))
    # After the restart every batch was still sampled with current weights (sync: staleness 0).
    if mode == "sync":
        assert history[-1]["batches_lost_total"] >= 1
    else:
        totals = json.loads((config.run.dir / "accounting.json").read_text())
        assert totals.get("batches_lost", 0) >= 1
        assert all(h["staleness_max"] <= config.system.max_staleness for h in history)
    assert np.isfinite([h["reward_mean"] for h in history]).all()
