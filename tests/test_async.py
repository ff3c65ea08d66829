"""Async mode through Ray: bounded staleness, backpressure and exact batch accounting."""

import json

import pytest
from accounting import assert_accounting

from ddpo.config import override
from ddpo.policy import LORA_TARGETS
from ddpo.presets import task_config
from learner.driver import train


@pytest.mark.slow
@pytest.mark.parametrize("max_staleness, num_samplers", [(0, 1), (1, 2)])
def test_async_staleness_and_accounting(
    ray_instance, small_config, tmp_path, max_staleness, num_samplers
):
    config = small_config(
        run={"epochs": 6},
        system={"mode": "async", "max_staleness": max_staleness, "num_samplers": num_samplers},
    )
    history = train(config)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == history and len(history) == config.run.epochs
    # Staleness never exceeds K, checked from the metrics the run wrote.
    assert all(r["staleness_max"] <= max_staleness for r in lines)
    for r in lines:
        hist = {
            int(k.rsplit("/", 1)[1]): n for k, n in r.items() if k.startswith("staleness/hist/")
        }
        assert sum(hist.values()) == 2 and max(hist) <= max_staleness
        assert 0 <= r["busy/sampler"] <= 1.01 and 0 <= r["busy/learner"] <= 1.01
        assert 0 <= r["reward/jpeg_compressibility/busy_fraction"] <= 1
    assert [r["policy_version"] for r in lines] == list(range(config.run.epochs))
    # Every sampled batch is trained once, dropped, or left unused at the end; with
    # backpressure none is sampled to be dropped or left over.
    totals = assert_accounting(tmp_path)
    assert totals["batches_trained"] == totals["batches_sampled"] == config.run.epochs * 2
    samples = [json.loads(s) for s in (tmp_path / "samples.jsonl").read_text().splitlines()]
    batch_ids = {s["batch_id"] for s in samples}
    assert len(batch_ids) == totals["batches_sampled"] - totals.get("batches_dropped_nonfinite", 0)
    assert (tmp_path / "lora/pytorch_lora_weights.safetensors").is_file()


def test_async_runs_in_one_process(small_config, tmp_path):
    """The async loop over the in-process wiring (it needed Ray): every call has returned when
    it is waited for, so it trains like a sync run, with the accounting of an async one."""
    from learner.wiring import InProcess

    config = small_config(run={"epochs": 3}, system={"mode": "async"})
    history = train(config, InProcess())
    assert [r["policy_version"] for r in history] == [0, 1, 2]
    # Backpressure: a call starts only for a batch the next update trains, so every batch
    # sampled is trained; the ones sampled during an update are one version old.
    totals = assert_accounting(tmp_path)
    assert totals["batches_trained"] == totals["batches_sampled"] == 3 * 2
    assert [r["staleness_max"] for r in history] == [0, 1, 1]
    assert (tmp_path / "lora/pytorch_lora_weights.safetensors").is_file()


UPDATES = 8
# The settings of the async studies (BENCHMARKS.md, "Async on the two-pass preset"): the
# compressibility preset with its adapters on the attention layers alone, at lr 1.5e-2, as the
# preset was until it moved them onto every layer at lr 3e-3 (which starts slower: at epoch 10 of
# the sync study two seeds of five were still below their start, "A CPU screen past 60 epochs, and
# the new compressibility preset"). In async mode, K = 1 and 2 samplers in one process, every one
# of seeds 0-4 gained by update 10, t 3.6 to 8.6 on the 48 fixed evaluation samples (the
# eight-head model). On the shipped one-head model ("One attention head") 5 updates gained too
# little to test (seeds 0-2: t 1.1, 2.2, 3.3); 8 updates gain +0.028, +0.029 and +0.020, t 5.0,
# 4.2 and 3.3, in about 30 s each on the faster machines; the demo's own preset at 8 updates: t
# 1.2, 4.1 and 4.2. In one process the samplers' calls and the updates alternate, so every batch
# after the first update is exactly one version stale and the run is deterministic at a fixed
# thread count: the threshold is checked against one draw (seed 0).
ATTENTION_ADAPTERS = {"train.lora_targets": tuple(LORA_TARGETS), "train.learning_rate": 1.5e-2}
MIN_T_GAIN = 3.0


@pytest.mark.slow
def test_async_run_of_the_tiny_preset_learns_within_its_staleness(tmp_path):
    """The tiny compressibility preset (adapters on attention, see ATTENTION_ADAPTERS) in async
    mode (K = 1, 2 samplers) for 8 updates: every update trains num_batches_per_epoch batches at
    most K versions old, versions advance one per update, the accounting balances, and the fixed
    evaluation samples' reward goes up, paired, with t >= 3.

    It runs in one process, where the worst staleness (every batch one version old) is the same
    every run; async through Ray, whose staleness depends on timing, is tested above. The
    learning claim itself, against shuffled-advantage controls on five seeds, is the study in
    BENCHMARKS.md; sync learning on the demo preset is asserted against controls in
    test_e2e.py."""
    from learner.evaluation import paired_gain, read_evals
    from learner.wiring import InProcess

    config = override(
        task_config("compressibility", "tiny"),
        ATTENTION_ADAPTERS
        | {
            "seed": 0,
            "run": {"epochs": UPDATES, "dir": tmp_path, "eval_every": 0},
            "system": {"mode": "async", "max_staleness": 1, "num_samplers": 2},
            "heldout_prompts": (),  # tested in test_learner and test_guard: here only a cost
        },
    )
    history = train(config, InProcess())
    nb = config.sample.num_batches_per_epoch
    assert [r["policy_version"] for r in history] == list(range(UPDATES))
    assert all(r["staleness_max"] <= 1 for r in history)
    assert any(r["staleness_max"] == 1 for r in history)  # async, not sync in disguise
    assert all(
        sum(v for k, v in r.items() if k.startswith("staleness/hist/")) == nb for r in history
    )
    assert assert_accounting(tmp_path)["batches_trained"] == UPDATES * nb
    evals = read_evals(tmp_path)
    assert [e["policy_version"] for e in (evals[0], evals[-1])] == [0, UPDATES]
    gain = paired_gain(evals[0]["rewards"], evals[-1]["rewards"])
    assert gain["t"] >= MIN_T_GAIN, gain


@pytest.mark.slow
def test_reward_pool_resizes_during_a_run_without_losing_a_batch(ray_instance, small_config):
    """control.json grows the reward pool while the async run goes on; then it shrinks back."""
    import threading
    import time

    config = small_config(
        run={"epochs": 8},
        system={"mode": "async", "reward_workers_range": ("jpeg_compressibility=1:3",)},
    )
    control, metrics = config.run.dir / "control.json", config.run.dir / "metrics.jsonl"

    def operator():
        for size, after_epochs in ((3, 2), (1, 5)):
            while not metrics.exists() or len(metrics.read_text().splitlines()) < after_epochs:
                time.sleep(0.2)
            control.write_text(json.dumps({"reward_workers": {"jpeg_compressibility": size}}))
            time.sleep(0.05)  # distinct mtimes for the two requests

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    history = train(config)
    thread.join(timeout=5)
    sizes = [r["reward_workers/jpeg_compressibility"] for r in history]
    assert sizes[0] == 1 and 3 in sizes and sizes[-1] < 3, sizes
    totals = assert_accounting(config.run.dir)
    assert totals["batches_trained"] == config.run.epochs * 2
