"""Paired evaluation statistics, against scipy's paired t-test, and the run's eval.jsonl."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from learner.evaluation import paired_gain, run_gain


def test_paired_gain_matches_scipy_ttest_rel():
    rng = np.random.default_rng(0)
    start = rng.normal(-1.1, 0.07, size=48)
    end = start + rng.normal(0.02, 0.01, size=48)  # a small shift, much smaller than the spread
    gain = paired_gain(start, end)
    reference = stats.ttest_rel(end, start)
    assert gain["t"] == pytest.approx(reference.statistic, rel=1e-12)
    assert gain["mean"] == pytest.approx(np.mean(end - start), rel=1e-12)
    assert gain["se"] == pytest.approx(stats.sem(end - start), rel=1e-12)
    assert gain["n"] == 48
    # Pairing is the point: the unpaired t of the same numbers is far smaller.
    assert gain["t"] > 5 * stats.ttest_ind(end, start).statistic


def test_paired_gain_edge_cases():
    assert paired_gain([1.0, 2.0], [1.0, 2.0]) == {"mean": 0.0, "se": 0.0, "t": 0.0, "n": 2}
    assert paired_gain([1.0, 2.0], [1.5, 2.5])["t"] == math.inf
    with pytest.raises(ValueError, match="equal-length"):
        paired_gain([1.0, 2.0], [1.0])


def test_run_gain_reads_start_and_end(tmp_path):
    lines = [
        {"when": "start", "reward_mean": -1.0, "rewards": [-1.0, -1.2, -0.8]},
        {"when": 5, "reward_mean": -0.9, "rewards": [-0.9, -1.0, -0.8]},
        {"when": "end", "reward_mean": -0.9, "rewards": [-0.8, -1.1, -0.8]},
    ]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    gain = run_gain(tmp_path)
    assert gain["mean"] == pytest.approx(0.1) and gain["n"] == 3
