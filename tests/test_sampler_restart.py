"""A sampler lost mid-run restarts, gets the newest weights before it samples again, and the
batch it lost is sampled again; the run completes with every epoch full."""

import json
import threading
import time

import numpy as np
import pytest


def kill_sampler_during(driver, after_epochs):
    """Kill sampler 0 (Ray restarts it) once `after_epochs` epochs are in metrics.jsonl."""
    import ray

    metrics = driver.run_dir / "metrics.jsonl"

    def killer():
        while not metrics.exists() or len(metrics.read_text().splitlines()) < after_epochs:
            time.sleep(0.05)
        time.sleep(0.3)  # inside the next epoch's sampling
        ray.kill(driver.samplers[0], no_restart=False)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_killed_sampler_restarts_with_newest_weights(ray_instance, small_config, mode):
    from ddpo.config import SampleConfig
    from learner.driver import Driver

    # Sampling takes about as long as training here, so the kill lands inside a sampler call.
    config = small_config(
        system={"mode": mode},
        run={"epochs": 3},
        sample=SampleConfig(num_steps=8, batch_size=8, num_batches_per_epoch=2),
    )
    driver = Driver(config)
    thread = kill_sampler_during(driver, after_epochs=1)
    history = driver.run()
    thread.join(timeout=10)
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
