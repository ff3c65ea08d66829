"""Fault injection on tiny runs: a reward actor, the learner, or a reward that goes bad, at
seeded random points. Every run completes (or stops saying how to resume); batches are never
trained twice; sync runs that lost and regained their learner end exactly where an uninterrupted
run ends. (Sampler loss: tests/test_sampler_restart.py; node loss: tests/test_multinode.py.)"""

import json
import logging
import threading
import time

import numpy as np
import pytest
from accounting import assert_accounting

from learner import checkpoint

LORA = "lora/pytorch_lora_weights.safetensors"


def fault_config(run_dir, **changes):
    from ddpo.config import SampleConfig, TrainConfig, override
    from ddpo.presets import task_config

    settings = {
        "run.epochs": 5,
        "run.dir": run_dir,
        "run.save_every": 1,
        "sample": SampleConfig(num_steps=4, batch_size=4, num_batches_per_epoch=2),
        "train": TrainConfig(learning_rate=1e-2, clip_range=0.1, batch_size=4),
        "grid_prompts": 2,
        "grid_seeds": 2,
    }
    return override(task_config("compressibility", "tiny"), settings | changes)


def records(run_dir):
    """metrics.jsonl without wall-clock times and busy fractions."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if "seconds" not in k and "busy" not in k}
        for line in lines
    ]


def kill_during(driver, pick_actor, seed, no_restart):
    """Kill `pick_actor(driver)` once a seeded random number (1-3) of epochs is logged, after a
    seeded random delay: somewhere inside sampling, scoring or the update of the next epoch."""
    import ray

    rng = np.random.default_rng(seed)
    after, delay = int(rng.integers(1, 4)), float(rng.uniform(0.0, 0.5))
    metrics = driver.run_dir / "metrics.jsonl"

    def killer():
        while not metrics.exists() or len(metrics.read_text().splitlines()) < after:
            time.sleep(0.02)
        time.sleep(delay)
        ray.kill(pick_actor(driver), no_restart=no_restart)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def straight(ray_instance, tmp_path_factory):
    """The reference: an uninterrupted sync run on Ray."""
    from learner.driver import train

    run_dir = tmp_path_factory.mktemp("straight")
    train(fault_config(run_dir))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1])
def test_a_lost_reward_actor_changes_nothing(straight, tmp_path, seed):
    from learner.driver import Driver

    driver = Driver(fault_config(tmp_path))
    killer = kill_during(driver, lambda d: d.pools["jpeg_compressibility"].actors[0], seed, False)
    driver.run()
    killer.join(timeout=30)
    assert not killer.is_alive()
    # Ray restarted the actor and re-ran its lost call: nothing resampled, every number equal.
    assert records(tmp_path) == records(straight)
    assert (tmp_path / LORA).read_bytes() == (straight / LORA).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2])
def test_a_lost_learner_stops_the_run_and_resume_ends_where_the_straight_run_does(
    straight, tmp_path, seed
):
    from learner.driver import Driver, train
    from learner.errors import LearnerLost

    driver = Driver(fault_config(tmp_path))
    killer = kill_during(driver, lambda d: d.learner, seed, True)
    with pytest.raises(LearnerLost, match=f"--resume {tmp_path}"):
        driver.run()
    killer.join(timeout=30)
    ckpt = checkpoint.latest(tmp_path)
    assert 1 <= ckpt.epoch < 5
    history = train(fault_config(tmp_path), resume=ckpt)
    assert [h["epoch"] for h in history] == list(range(5))
    assert records(tmp_path) == records(straight)
    assert (tmp_path / LORA).read_bytes() == (straight / LORA).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [3])
def test_auto_resume_replaces_a_lost_learner_in_sync_mode_exactly(straight, tmp_path, seed):
    from learner.driver import Driver

    driver = Driver(fault_config(tmp_path, run={"auto_resume": True}))
    killer = kill_during(driver, lambda d: d.learner, seed, True)
    history = driver.run()
    killer.join(timeout=30)
    assert driver.resumes == 1
    assert [h["epoch"] for h in history] == list(range(5))
    assert records(tmp_path) == records(straight)
    assert (tmp_path / LORA).read_bytes() == (straight / LORA).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [4])
def test_auto_resume_in_async_mode_keeps_the_accounting(ray_instance, tmp_path, seed):
    from learner.driver import Driver

    config = fault_config(
        tmp_path, run={"epochs": 6, "auto_resume": True}, system={"mode": "async"}
    )
    driver = Driver(config)
    killer = kill_during(driver, lambda d: d.learner, seed, True)
    history = driver.run()
    killer.join(timeout=30)
    assert driver.resumes == 1
    assert [h["epoch"] for h in history] == list(range(6))
    assert [h["policy_version"] for h in history] == list(range(6))
    totals = assert_accounting(tmp_path)
    nb = config.sample.num_batches_per_epoch
    assert totals["batches_trained"] == 6 * nb
    assert all(h["staleness_max"] <= config.system.max_staleness for h in history)


# ----- bad rewards, in one process -----
def bad_reward(monkeypatch, score):
    """Make the jpeg_compressibility reward `score(images, prompts, call) -> (rewards, info)`."""
    import rewards

    calls = []

    def factory():
        def fn(images, prompts):
            calls.append(len(images))
            return score(images, prompts, len(calls))

        return fn

    monkeypatch.setitem(rewards.REWARDS, "jpeg_compressibility", factory)
    return calls


def honest(images, prompts, call):
    from rewards.jpeg import jpeg_size_kb

    return -jpeg_size_kb(images), {}


def test_nonfinite_and_miscounted_rewards_drop_their_batch_and_the_run_goes_on(
    small_config, monkeypatch, caplog
):
    from learner.driver import train
    from learner.wiring import InProcess

    def flaky(images, prompts, call):
        rewards, info = honest(images, prompts, call)
        # The start evaluation is calls 1 (the grid) and 2 (the held-out prompts); then epoch
        # 0's two batches, calls 3 and 4.
        if call == 3:
            rewards[1] = np.nan
        if call == 6:  # epoch 1's second batch: one reward short
            return rewards[:-1], info
        return rewards, info

    bad_reward(monkeypatch, flaky)
    with caplog.at_level(logging.WARNING):
        history = train(small_config(run={"epochs": 3}), InProcess())
    assert [h["batches_dropped"] for h in history] == [1, 1, 0]
    assert [h["samples"] for h in history] == [4, 4, 8]
    assert "returned shape (3,) for 4 images" in caplog.text  # the reward_error, logged


def test_a_reward_that_keeps_failing_stops_the_run_with_how_to_resume(small_config, monkeypatch):
    from learner.driver import train
    from learner.errors import RewardBroken
    from learner.wiring import InProcess

    def broken(images, prompts, call):
        rewards, info = honest(images, prompts, call)
        # The start evaluation (calls 1 and 2: the grid and the held-out prompts) still works.
        return (rewards if call <= 2 else rewards * np.inf), info

    bad_reward(monkeypatch, broken)
    config = small_config(run={"epochs": 4}, system={"max_bad_batches": 3})
    with pytest.raises(RewardBroken, match="3 batches in a row.*--resume"):
        train(config, InProcess())
    assert checkpoint.latest(config.run.dir).epoch == 0  # the checkpoint before it is intact


@pytest.mark.parametrize("failing, recorded", [({5}, True), ({5, 6}, False)])
def test_an_evaluation_with_failed_rewards_is_scored_again_then_left_out(
    small_config, monkeypatch, caplog, failing, recorded
):
    """Calls 1-2 are the start evaluation, 3-4 epoch 0's batches, 5 the grid of the evaluation
    after epoch 1 (6 its second scoring if 5 failed, then its held-out prompts). A reward that
    fails once is asked again and the evaluation kept; one that fails twice leaves the
    evaluation out of eval.jsonl, with a warning, and the run goes on to its end."""
    from learner.driver import train
    from learner.evaluation import read_evals
    from learner.wiring import InProcess

    def flaky(images, prompts, call):
        rewards, info = honest(images, prompts, call)
        return (rewards * np.nan if call in failing else rewards), info

    calls = bad_reward(monkeypatch, flaky)
    config = small_config(run={"epochs": 2, "eval_every": 1})
    with caplog.at_level(logging.WARNING):
        history = train(config, InProcess())
    assert len(history) == 2 and [h["batches_dropped"] for h in history] == [0, 0]
    evals = read_evals(config.run.dir)
    assert [e["when"] for e in evals] == (["start", 1, "end"] if recorded else ["start", "end"])
    assert all(np.isfinite(e["rewards"]).all() for e in evals)
    # The start, epoch 0, after 1 (its grid scored twice, its held-out prompts), epoch 1, the end.
    assert len(calls) == 2 + 2 + 3 + 2 + 2
    left_out = "the evaluation after 1 is not recorded: 4 of 4 rewards failed (not finite)"
    assert (left_out in caplog.text) is not recorded, caplog.text


def test_failed_start_or_end_evaluations_stop_the_run_saying_what_to_do(small_config, monkeypatch):
    from learner.driver import train
    from learner.errors import RewardBroken
    from learner.evaluation import read_evals
    from learner.wiring import InProcess

    def flaky(images, prompts, call):
        rewards, info = honest(images, prompts, call)
        return (rewards * -np.inf if call in failing else rewards), info

    failing = {1, 2}  # the start grid, twice
    bad_reward(monkeypatch, flaky)
    config = small_config(run={"epochs": 1})
    with pytest.raises(
        RewardBroken,
        match="the start evaluation: 4 of 4 rewards failed.*again with another --run-dir",
    ):
        train(config, InProcess())
    assert checkpoint.latest(config.run.dir) is None  # nothing trained, nothing to resume

    # Calls: the start (1, 2), epoch 0 (3, 4), the end's grid twice (5, 6), held-out (7).
    failing = {5, 6}
    bad_reward(monkeypatch, flaky)  # its calls counted from 1 again
    config = small_config(run={"epochs": 1, "dir": config.run.dir.parent / "end"})
    with pytest.raises(RewardBroken, match=f"the end evaluation.*--resume {config.run.dir}$"):
        train(config, InProcess())
    assert [e["when"] for e in read_evals(config.run.dir)] == ["start"]
    # As the error says: --resume evaluates the trained weights, and trains nothing more.
    failing = set()
    history = train(config, InProcess(), resume=checkpoint.latest(config.run.dir))
    assert len(history) == 1
    assert [e["when"] for e in read_evals(config.run.dir)] == ["start", "end"]


def test_a_missing_model_stops_before_anything_is_written(small_config, tmp_path):
    from ddpo.policy import ModelLoadError
    from learner.driver import train
    from learner.wiring import InProcess

    run_dir = tmp_path / "run"
    with pytest.raises(ModelLoadError, match="neither `tiny`, an existing directory"):
        train(small_config(model="./no/such/model", run={"dir": run_dir}), InProcess())
    assert not run_dir.exists()


def test_weights_that_diverged_stop_the_run_in_one_line_saying_what_to_change(
    tmp_path, monkeypatch, capsys
):
    """A sampler that draws non-finite log-probs (weights diverged, as one decoupled async run
    through Ray did) stops the run with exit status 1 and one line naming the batch, where to
    look and what to change, not a traceback; the checkpoints written before stay."""
    import ddpo.policy
    from learner.learner import Learner
    from learner.run import main

    step, update, diverged = ddpo.policy.ddim_step_with_log_prob, Learner.update, []

    def step_after_the_first_update(*args, **kwargs):
        x, log_prob = step(*args, **kwargs)
        return x, log_prob * float("nan") if diverged else log_prob

    def first_update_diverges(self, *args, **kwargs):
        diverged.append(True)
        return update(self, *args, **kwargs)

    monkeypatch.setattr(ddpo.policy, "ddim_step_with_log_prob", step_after_the_first_update)
    monkeypatch.setattr(Learner, "update", first_update_diverges)
    run_dir = tmp_path / "run"
    argv = [
        "--task", "compressibility", "--model", "tiny", "--epochs", "3", "--run-dir",
        str(run_dir), "--in-process", "--eval-every", "0", "--sample.num-steps", "4",
        "--sample.batch-size", "4", "--sample.num-batches-per-epoch", "2",
        "--train.batch-size", "4", "--grid-prompts", "2", "--grid-seeds", "2",
        "--save-every", "1",
    ]  # fmt: skip
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 1, err
    assert len(err) == 1 and err[0].startswith("error: a sampler drew non-finite log-probs"), err
    assert "(policy version 1)" in err[0] and "--learning-rate" in err[0]
    assert str(run_dir / "metrics.jsonl") in err[0]
    assert checkpoint.checkpoints(run_dir)  # what ran before is kept
