"""Async mode through Ray: bounded staleness, backpressure and exact batch accounting."""

import dataclasses
import json

import pytest

from ddpo.config import task_config
from learner.run import train


@pytest.mark.slow
@pytest.mark.parametrize("max_staleness, num_samplers", [(0, 1), (1, 2)])
def test_async_staleness_and_accounting(
    ray_instance, small_config, tmp_path, max_staleness, num_samplers
):
    config = small_config(
        mode="async", epochs=6, max_staleness=max_staleness, num_samplers=num_samplers
    )
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


def test_async_needs_ray(small_config):
    from learner.run import InProcess

    with pytest.raises(ValueError, match="async runs on Ray only"):
        train(small_config(mode="async", epochs=1), InProcess())


@pytest.mark.slow
def test_async_run_learns_against_its_lr_zero_twin(ray_instance, tmp_path):
    """Batch n samples the same prompts and seeds in every async run, so the rewards of the
    batches trained in the last updates pair up with the same batches of an lr-0 run."""
    rewards = {}
    for lr in (0.0, 1e-2):
        config = dataclasses.replace(
            task_config("compressibility", "tiny"),
            mode="async",
            epochs=12,
            max_staleness=1,
            run_dir=tmp_path / f"lr{lr}",
            train=dataclasses.replace(task_config("compressibility").train, learning_rate=lr),
        )
        train(config)
        per_batch = {}
        for line in (config.run_dir / "samples.jsonl").read_text().splitlines():
            s = json.loads(line)
            per_batch.setdefault(s["batch_id"], []).append(s["reward"])
        rewards[lr] = {b: sum(v) / len(v) for b, v in per_batch.items()}
    # The batches sampled late in the trained run, paired with the same batches at lr 0.
    late = sorted(rewards[1e-2], key=lambda b: int(b.split("-")[1]))[-16:]
    late = [b for b in late if b in rewards[0.0]]
    gain = sum(rewards[1e-2][b] - rewards[0.0][b] for b in late) / len(late)
    assert len(late) >= 8 and gain > 0.01, gain
