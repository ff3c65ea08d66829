"""Async mode through Ray: bounded staleness, backpressure and exact batch accounting."""

import dataclasses
import json

import pytest

from ddpo.config import SampleConfig, TrainConfig, task_config
from learner.run import train


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def small(tmp_path, **changes):
    settings = dict(
        mode="async",
        epochs=6,
        run_dir=tmp_path,
        sample=SampleConfig(num_steps=4, batch_size=4, num_batches_per_epoch=2),
        train=TrainConfig(learning_rate=1e-2, clip_range=0.1, batch_size=4),
        grid_prompts=2,
        grid_seeds=2,
    )
    return dataclasses.replace(task_config("compressibility", "tiny"), **(settings | changes))


@pytest.mark.slow
@pytest.mark.parametrize("max_staleness, num_samplers", [(0, 1), (1, 2)])
def test_async_staleness_and_accounting(ray_instance, tmp_path, max_staleness, num_samplers):
    config = small(tmp_path, max_staleness=max_staleness, num_samplers=num_samplers)
    history = train(config)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == history and len(history) == config.epochs
    # Staleness never exceeds K, checked from the metrics the run wrote.
    assert all(r["staleness_max"] <= max_staleness for r in lines)
    for r in lines:
        hist = {
            int(k.rsplit("/", 1)[1]): n for k, n in r.items() if k.startswith("staleness/hist/")
        }
        assert sum(hist.values()) == 2 and max(hist) <= max_staleness
        assert 0 <= r["busy/sampler"] <= 1.01 and 0 <= r["busy/learner"] <= 1.01
    assert [r["policy_version"] for r in lines] == list(range(config.epochs))
    # Every sampled batch is trained once, dropped, or left unused at the end.
    totals = json.loads((tmp_path / "accounting.json").read_text())
    assert totals["batches_trained"] == config.epochs * 2
    accounted = sum(
        totals.get(k, 0)
        for k in (
            "batches_trained",
            "batches_dropped_stale",
            "batches_dropped_nonfinite",
            "batches_unused",
        )
    )
    assert totals["batches_sampled"] == accounted
    samples = [json.loads(s) for s in (tmp_path / "samples.jsonl").read_text().splitlines()]
    batch_ids = {s["batch_id"] for s in samples}
    assert len(batch_ids) == totals["batches_sampled"] - totals.get("batches_dropped_nonfinite", 0)
    assert (tmp_path / "lora/pytorch_lora_weights.safetensors").is_file()


def test_async_needs_ray(tmp_path):
    from learner.run import InProcess

    with pytest.raises(ValueError, match="async runs on Ray only"):
        train(small(tmp_path, epochs=1), InProcess())
