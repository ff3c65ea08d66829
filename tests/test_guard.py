"""The over-optimization guard's decision and its spec, on synthetic paired rewards."""

import numpy as np
import pytest

from learner.guard import Guard, evaluation_score

KNOWN = ["aesthetic", "alignment", "jpeg_compressibility", "jpeg_incompressibility"]


def test_parse():
    assert Guard.parse("aesthetic:0.5", ["jpeg_compressibility"], KNOWN) == Guard("aesthetic", 0.5)
    assert Guard.parse("aesthetic", ["jpeg_compressibility"], KNOWN) == Guard("aesthetic", 0.0)
    for spec, message in [
        ("nope:1", "unknown reward 'nope'"),
        ("jpeg_compressibility:1", "is trained on"),
        ("aesthetic:x", "write REWARD:MAX_DROP"),
        ("aesthetic:-1", "MAX_DROP must be a number >= 0"),
        ("aesthetic:nan", "MAX_DROP must be a number >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            Guard.parse(spec, ["jpeg_compressibility"], KNOWN)


def test_verdict_needs_a_drop_beyond_max_drop_and_beyond_noise():
    rng = np.random.default_rng(0)
    start = rng.normal(5.0, 1.0, 48)
    noise = rng.normal(0.0, 0.05, 48)
    guard = Guard("aesthetic", max_drop=0.2)
    assert guard.verdict(start.tolist(), (start + noise).tolist()) is None  # no change
    assert guard.verdict(start.tolist(), (start - 0.1 + noise).tolist()) is None  # within 0.2
    fired = guard.verdict(start.tolist(), (start - 0.5 + noise).tolist())
    assert fired and "aesthetic fell 0.49" in fired
    # A drop as large but as noisy as the samples themselves is not significant.
    wild = start - 0.5 + rng.normal(0.0, 5.0, 48)
    assert Guard("aesthetic", 0.0).verdict(start.tolist(), wild.tolist()) is None
    assert guard.verdict(start.tolist(), (start + 1.0).tolist()) is None  # a rise never fires


def test_best_follows_the_heldout_evaluation_when_there_is_one():
    assert evaluation_score({"reward_mean": 1.0}) == 1.0
    assert evaluation_score({"reward_mean": 1.0, "heldout": {"reward_mean": -2.0}}) == -2.0


def falling_reward():
    """A test reward that falls by 1 at every call, with a little per-image noise: a guard
    reward that is being ruined."""
    calls = []

    def score(images, prompts):
        calls.append(len(images))
        noise = np.random.default_rng(len(calls)).normal(0.0, 0.01, len(images))
        return (noise - len(calls)).astype(np.float32), {}

    return score


def test_a_falling_guard_stops_the_run_and_best_holds_the_best_evaluation(tmp_path, monkeypatch):
    import json

    from ddpo.config import SampleConfig, StatTrackerConfig, TrainConfig, override
    from ddpo.presets import task_config
    from learner.driver import train
    from learner.evaluation import read_evals
    from learner.wiring import InProcess
    from rewards import REWARDS

    monkeypatch.setitem(REWARDS, "falling", falling_reward)
    config = override(
        task_config("compressibility", "tiny"),
        {
            "run": {"epochs": 4, "eval_every": 1, "dir": tmp_path},
            "guard": "falling:0.5",
            "sample": SampleConfig(num_steps=4, batch_size=4, num_batches_per_epoch=2),
            "train": TrainConfig(learning_rate=3e-2, batch_size=4),
            "stat_tracker": StatTrackerConfig(buffer_size=4, min_count=2),
            "grid_prompts": 2,
            "grid_seeds": 2,
        },
    )
    history = train(config, InProcess())
    # Held-out evaluation scores the guard too (the guard's second call): at epoch 1 it has
    # fallen by 2 from the start's training-prompt score, so the run stops after one epoch.
    assert len(history) == 1
    evals = read_evals(tmp_path)
    assert [e["when"] for e in evals] == ["start", 1, "end"]
    assert all(e["guard"]["reward"] == "falling" for e in evals)
    best = json.loads((tmp_path / "best" / "evaluation.json").read_text())
    scores = [e["heldout"]["reward_mean"] for e in evals]
    assert best["when"] == evals[scores.index(max(scores))]["when"]
    assert (tmp_path / "best" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "signals.png").is_file()  # the report plots the guard's fall
    # The run can be exported with either weights; the card states the held-out gain.
    from learner.export import export_lora

    export_lora(tmp_path, tmp_path / "export-best", weights="best")
    card = (tmp_path / "export-best" / "README.md").read_text()
    assert "the best weights" in card and "held-out, never trained on" in card
