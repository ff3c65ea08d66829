"""The reward registry: specs, weighted sums, option routing, and cheap Ray-free imports."""

import json
import subprocess
import sys

import numpy as np
import pytest

from rewards import (
    combine_rewards,
    concat_infos,
    make_reward,
    parse_reward_options,
    parse_reward_spec,
    reward_options,
    sample_records,
)
from rewards.jpeg import jpeg_size_kb


def test_parse_reward_spec():
    assert parse_reward_spec("aesthetic") == [(1.0, "aesthetic")]
    assert parse_reward_spec("aesthetic + 0.5*alignment") == [
        (1.0, "aesthetic"),
        (0.5, "alignment"),
    ]
    assert parse_reward_spec("-2*jpeg_compressibility") == [(-2.0, "jpeg_compressibility")]
    for bad in ("nope", "x*aesthetic", "aesthetic+", "0.5*aesthetic+aesthetic"):
        with pytest.raises(ValueError, match="reward"):
            parse_reward_spec(bad)


def test_options_go_to_the_factories_that_take_them():
    routed = reward_options("aesthetic+0.5*alignment", {"device": "cpu", "mlp_path": "m.pth"})
    assert routed == {
        "aesthetic": {"device": "cpu", "mlp_path": "m.pth"},
        "alignment": {"device": "cpu"},
    }
    tiny = reward_options("alignment", {"bertscore_model": "./bert"}, tiny=True)
    assert tiny == {"alignment": {"llava_model": "tiny", "bertscore_model": "./bert"}}
    with pytest.raises(ValueError, match="llava_model not taken by 'aesthetic'"):
        reward_options("aesthetic", {"llava_model": "x"})
    with pytest.raises(ValueError, match="no options"):
        make_reward("jpeg_compressibility", device="cpu")


def test_parse_reward_options_aliases():
    got = parse_reward_options(
        ["clip=./clip", "mlp=a.pth", "llava=x", "bertscore=y", "batch_size=4"]
    )
    assert got == {
        "clip_model": "./clip",
        "mlp_path": "a.pth",
        "llava_model": "x",
        "bertscore_model": "y",
        "batch_size": "4",
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_reward_options(["clip"])


def test_weighted_sum_of_rewards():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    images[0] = 7  # a flat image compresses best
    size = jpeg_size_kb(images)
    fn = make_reward("jpeg_compressibility+0.25*jpeg_incompressibility")
    rewards, info = fn(images, ["a", "b", "c"])
    np.testing.assert_allclose(rewards, -size + 0.25 * size, rtol=1e-6)
    np.testing.assert_allclose(info["jpeg_compressibility/reward"], -size)
    np.testing.assert_allclose(info["jpeg_incompressibility/jpeg_kb"], size)
    # The same sum from separately computed results (one actor per term).
    terms = parse_reward_spec("jpeg_compressibility+0.25*jpeg_incompressibility")
    results = {name: make_reward(name)(images, ["a", "b", "c"]) for _, name in terms}
    np.testing.assert_allclose(combine_rewards(terms, results)[0], rewards)


def test_concat_infos_and_sample_records():
    a = {"answer": ["x"], "recall": np.array([0.5], np.float32), "batch_id": "0-0"}
    b = {"answer": ["y", "z"], "recall": np.array([0.1, 0.2], np.float32), "batch_id": "0-1"}
    got = concat_infos([a, b])
    assert got["answer"] == ["x", "y", "z"] and got["batch_id"] == ["0-0", "0-1"]
    np.testing.assert_array_equal(got["recall"], np.array([0.5, 0.1, 0.2], np.float32))
    records = sample_records(["p", "q", "r"], np.array([1, 2, 3], np.float32), got)
    assert records[1] == {"prompt": "q", "reward": 2.0, "answer": "y", "recall": pytest.approx(0.1)}
    json.dumps(records)  # plain Python values only


def test_importing_rewards_is_cheap_and_ray_free():
    code = (
        "import sys, rewards, rewards.serve, actors.reward; "
        "heavy = {'torch', 'transformers', 'ray', 'bert_score'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
