"""A data-parallel learner group (issue 15): 2 gloo learners on CPU train as 1 learner does,
run sync and async end to end, stop together when a rank is lost, and resume every rank from
rank 0's checkpoint."""

import dataclasses
import json
import threading
import time

import numpy as np
import pytest
import torch
from accounting import assert_accounting

from learner import checkpoint

LORA = "lora/pytorch_lora_weights.safetensors"


def group_config(run_dir, **changes):
    """Tiny runs: minibatches of 4 (2 a rank), 2 per optimizer step, half the steps trained."""
    from ddpo.config import SampleConfig, TrainConfig, task_config

    settings = dict(
        epochs=3,
        run_dir=run_dir,
        save_every=1,
        num_learners=2,
        heldout_prompts=(),
        sample=SampleConfig(num_steps=4, batch_size=4, num_batches_per_epoch=2),
        train=TrainConfig(
            learning_rate=1e-2,
            clip_range=0.1,
            batch_size=4,
            gradient_accumulation_steps=2,
            timestep_fraction=0.5,
        ),
        grid_prompts=1,
        grid_seeds=2,
    )
    return dataclasses.replace(task_config("compressibility", "tiny"), **(settings | changes))


def records(run_dir):
    """metrics.jsonl without wall-clock times and busy fractions."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if "seconds" not in k and "busy" not in k}
        for line in lines
    ]


def kill_rank_during(driver, rank, after_epochs):
    """Kill learner `rank` (no restart) once `after_epochs` epochs are in metrics.jsonl."""
    import ray

    metrics = driver.run_dir / "metrics.jsonl"

    def killer():
        while not metrics.exists() or len(metrics.read_text().splitlines()) < after_epochs:
            time.sleep(0.02)
        ray.kill(driver.fleet.learners.ranks[rank], no_restart=True)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread


def test_two_gloo_learners_update_as_one_learner(ray_instance, tmp_path):
    """Same trajectories, 2 updates: 1 learner in this process against a group of 2 Ray actors;
    the LoRA weights agree to 1e-5 and both ranks hold the same weights and AdamW state."""
    from learner.group import LearnerGroup, merged_metrics
    from learner.learner import Learner
    from learner.wiring import OnRay

    # The paper's LoRA learning rate: AdamW divides each gradient element by its own scale, so
    # the roundoff of summing shards (1e-7 relative) can move a near-zero element by up to lr:
    # one learner with 1 and with 2 threads differs by 2.5e-6 here, the group by about as much.
    config = group_config(tmp_path)
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, learning_rate=3e-4)
    )
    alone = Learner(config, threads=1)
    start = alone.policy.lora_state_dict()
    prompts = [config.prompts[i % len(config.prompts)] for i in range(16)]
    epochs = [
        [alone.policy.sample(prompts[i : i + 4], range(i, i + 4), batch_id=f"{i}") for i in (0, 4)],
        [
            alone.policy.sample(prompts[i : i + 4], range(i, i + 4), batch_id=f"{i}")
            for i in (8, 12)
        ],
    ]
    advantages = [np.linspace(-1, 1, 8)[::-1].copy(), np.linspace(-2, 1, 8)]

    wiring = OnRay(None, min_cpus=1, resources={})
    group = LearnerGroup(
        wiring,
        lambda placement: wiring.create(Learner, config, 1, options={"num_cpus": 1} | placement),
        2,
        {"CPU": 1},
        "PACK",
        tmp_path,
    )
    try:
        for batches, adv in zip(epochs, advantages, strict=True):
            want = alone.update(adv, adv, *batches)
            refs = [ray_instance.put(b) for b in batches]  # each rank fetches them itself
            got = merged_metrics(group.gather(group.call_all("update", adv, adv, *refs)))
            assert got["policy_version"] == want["policy_version"]
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-7)
        states = wiring.get([wiring.call(r, "state", num_returns=2)[0] for r in group.ranks])
    finally:
        group.stop()
    lora = alone.policy.lora_state_dict()
    diff = max(float((states[0][f"lora.{k}"] - v).abs().max()) for k, v in lora.items())
    print(f"max |diff| of the LoRA weights, 2 learners against 1: {diff:.2e}")
    assert diff <= 1e-5
    moved = max(float((v - start[k]).abs().max()) for k, v in lora.items())
    assert moved > 50 * max(diff, 1e-7)  # the weights moved (6e-4), far beyond the difference
    # Every rank holds the same weights, AdamW moments and generator state.
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_a_batch_that_does_not_divide_over_the_learners_is_refused(tmp_path):
    from ddpo.config import TrainConfig

    with pytest.raises(ValueError, match="train.batch_size=3 does not divide over num_learners=2"):
        group_config(tmp_path, train=TrainConfig(batch_size=3))


@pytest.fixture(scope="module")
def straight(ray_instance, tmp_path_factory):
    """An uninterrupted sync run of 2 learners: the reference of the fault tests."""
    from learner.driver import train

    run_dir = tmp_path_factory.mktemp("straight")
    history = train(group_config(run_dir))
    return run_dir, history


def test_a_sync_run_with_two_learners(straight):
    run_dir, history = straight
    assert [h["policy_version"] for h in history] == [0, 1, 2]
    assert all(np.isfinite(h["loss"]) and h["samples"] == 8 for h in history)
    assert (run_dir / LORA).is_file()
    assert checkpoint.latest(run_dir).epoch == 3  # rank 0 wrote the one checkpoint a save
    assert json.loads((run_dir / "config.json").read_text())["num_learners"] == 2


@pytest.mark.slow
def test_a_lost_rank_stops_the_group_and_resume_restores_every_rank(straight, tmp_path):
    from learner.driver import Driver, train
    from learner.errors import LearnerLost

    driver = Driver(group_config(tmp_path))
    killer = kill_rank_during(driver, rank=1, after_epochs=1)
    with pytest.raises(LearnerLost, match=f"learner actor was lost.*--resume {tmp_path}"):
        driver.run()
    killer.join(timeout=30)
    ckpt = checkpoint.latest(tmp_path)
    assert 1 <= ckpt.epoch < 3
    # Both ranks load rank 0's checkpoint (the ranks' versions are checked at every update).
    history = train(group_config(tmp_path), resume=ckpt)
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert records(tmp_path) == records(straight[0])
    assert (tmp_path / LORA).read_bytes() == (straight[0] / LORA).read_bytes()


@pytest.mark.slow
def test_auto_resume_restarts_the_whole_group(straight, tmp_path):
    from learner.driver import Driver

    driver = Driver(group_config(tmp_path, auto_resume=True))
    killer = kill_rank_during(driver, rank=0, after_epochs=1)
    history = driver.run()
    killer.join(timeout=30)
    assert driver.resumes == 1
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert records(tmp_path) == records(straight[0])
    assert (tmp_path / LORA).read_bytes() == (straight[0] / LORA).read_bytes()


@pytest.mark.slow
def test_an_async_run_with_two_learners(ray_instance, tmp_path):
    from learner.driver import train

    config = group_config(tmp_path, mode="async", epochs=3, save_every=0)
    history = train(config)
    assert [h["policy_version"] for h in history] == [0, 1, 2]
    assert all(h["staleness_max"] <= config.max_staleness for h in history)
    assert assert_accounting(tmp_path)["batches_trained"] == 3 * 2
