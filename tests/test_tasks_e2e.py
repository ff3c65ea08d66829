"""The aesthetic and alignment tasks (and a weighted sum, through Ray) run end to end on the
tiny models: tiny CLIP + MLP, tiny LLaVA + the packaged MiniLM for BERTScore."""

import json

import numpy as np
import pytest

from learner.driver import train


@pytest.mark.slow
@pytest.mark.parametrize(
    "task, reward, through_ray",
    [
        ("aesthetic", "aesthetic", False),
        ("alignment", "alignment", False),
        # Both reward models as Ray actors in one run; the single-reward runs take the same
        # code path in one process (each Ray run costs about 10 s of actor start-up here).
        ("alignment", "aesthetic+0.5*alignment", True),
    ],
)
def test_task_runs_end_to_end(request, small_config, tmp_path, task, reward, through_ray):
    from learner.wiring import InProcess

    wiring = None if through_ray else InProcess()
    if through_ray:
        request.getfixturevalue("ray_instance")
    history = train(small_config(task, reward=reward), wiring)
    assert [h["epoch"] for h in history] == [0, 1]
    assert all(np.isfinite(h["reward_mean"]) and h["samples"] == 8 for h in history)
    samples = [json.loads(s) for s in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16
    if "alignment" in reward:
        # LLaVA's answer and the BERTScore parts are kept for inspection, per sample.
        assert all(isinstance(s["alignment/answer"], str) for s in samples)
        assert all(0 <= s["alignment/recall"] <= 1.0001 for s in samples)
    if "+" in reward:
        # The combined reward is the weighted sum of the terms, per sample.
        for s in samples:
            expected = s["aesthetic/reward"] + 0.5 * s["alignment/reward"]
            assert s["reward"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert {"reward/aesthetic/mean", "reward/alignment/mean"} <= history[0].keys()
