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
