"""A data-parallel learner group (issue 15): 2 gloo learners on CPU train as 1 learner does,
run sync and async end to end, stop together when a rank is lost, and resume every rank from
rank 0's checkpoint. Few runs, 2 epochs each: CI has 2 cores and a time budget."""

import json
import threading
import time

import numpy as np
import pytest
import torch
from accounting import assert_accounting

from ddpo.config import override
from learner import checkpoint

LORA = "lora/pytorch_lora_weights.safetensors"


def group_config(run_dir, **changes):
    """Tiny runs: minibatches of 4 (2 a rank), 2 per optimizer step, half the steps trained;
    `changes` as `ddpo.config.override` takes them (e.g. {"system.mode": "async"})."""
    from ddpo.config import SampleConfig, TrainConfig
    from ddpo.presets import task_config

    settings = {
        "run": {"epochs": 2, "dir": run_dir, "save_every": 1},
        "system.num_learners": 2,
        "heldout_prompts": (),
        "sample": SampleConfig(num_steps=4, batch_size=4, num_batches_per_epoch=2),
        "train": TrainConfig(
            learning_rate=1e-2,
            clip_range=0.1,
            batch_size=4,
            gradient_accumulation_steps=2,
            timestep_fraction=0.5,
        ),
        "grid_prompts": 1,
        "grid_seeds": 2,
    }
    return override(task_config("compressibility", "tiny"), settings | changes)


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


def norm(a: dict, b: dict) -> float:
    """The Frobenius norm of a - b over all the tensors of two state dicts."""
    return float(sum(((a[k] - b[k]).double() ** 2).sum() for k in a) ** 0.5)


def test_two_gloo_learners_update_as_one_learner(ray_instance, tmp_path):
    """Same trajectories, 2 updates: 1 learner in this process against a group of 2 Ray actors.
    The LoRA weights agree to roundoff; both ranks hold the same weights, AdamW state and generator;
    both restore a checkpoint of rank 0 exactly; a lost rank stops the group."""
    from learner.errors import LearnerLost
    from learner.group import LearnerGroup, merged_metrics
    from learner.learner import Learner
    from learner.wiring import OnRay

    # The paper's LoRA learning rate: AdamW divides each gradient element by its own scale, so
    # the roundoff of summing shards (1e-7 relative) can move a near-zero element by up to lr:
    # one learner with 1 and with 2 threads differs by 2.5e-6 here, the group by about as much.
    # Two inner epochs, the second stopped by target_kl (any move exceeds 1e-12): every rank
    # must take the same decision from the group's KL, or the next all-reduce would hang.
    config = group_config(tmp_path)
    config = override(
        config,
        {"train.learning_rate": 3e-4, "train.num_inner_epochs": 2, "train.target_kl": 1e-12},
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

    def update(epoch):
        refs = [ray_instance.put(b) for b in epochs[epoch]]  # each rank fetches them itself
        adv = advantages[epoch]
        return merged_metrics(group.gather(group.call_all("update", adv, adv, *refs)))

    def states():
        return wiring.get([wiring.call(r, "state", num_returns=2)[0] for r in group.ranks])

    try:
        for epoch in range(2):
            want, got = (
                alone.update(advantages[epoch], advantages[epoch], *epochs[epoch]),
                update(epoch),
            )
            assert got["policy_version"] == want["policy_version"]
            assert got["early_stopped"] == want["early_stopped"] == 1.0
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-7)
            if epoch == 0:
                saved = group.ask("state", num_returns=2)  # rank 0's checkpoint
        after = states()
        # Every rank restores rank 0's checkpoint and trains on exactly as before.
        assert group.ask_all("load_state", *saved) == 1
        update(1)
        again = states()
        assert all(torch.equal(again[r][k], after[r][k]) for r in (0, 1) for k in after[0])
        # A lost rank stops the whole group, with how to resume.
        ray_instance.kill(group.ranks[1], no_restart=True)
        with pytest.raises(LearnerLost, match=f"learner actor was lost.*--resume {tmp_path}"):
            update(1)
        with pytest.raises(ray_instance.exceptions.RayActorError):
            ray_instance.get(group.lead.weights.remote())
    finally:
        group.stop()
    lora = alone.policy.lora_state_dict()
    group_lora = {k: after[0][f"lora.{k}"] for k in lora}
    diff = max(float((group_lora[k] - v).abs().max()) for k, v in lora.items())
    moved = max(float((v - start[k]).abs().max()) for k, v in lora.items())
    relative = norm(group_lora, lora) / norm(lora, start)
    print(
        f"2 learners against 1: max |diff| {diff:.2e}, moved {moved:.2e}, relative {relative:.2e}"
    )
    # AdamW bounds an element's step by about lr whatever its gradient, so roundoff can move a
    # single element by up to 2 lr an update; the whole update agrees far closer than that.
    assert diff <= 0.1 * config.train.learning_rate
    assert relative <= 1e-3
    # Every rank holds the same weights, AdamW moments and generator state.
    assert after[0].keys() == after[1].keys()
    assert all(torch.equal(after[0][k], after[1][k]) for k in after[0])


def test_a_batch_that_does_not_divide_over_the_learners_is_refused(tmp_path):
    from ddpo.config import TrainConfig

    match = "train.batch_size=3 does not divide over system.num_learners=2"
    with pytest.raises(ValueError, match=match):
        group_config(tmp_path, train=TrainConfig(batch_size=3))  # the minibatch of 4 made 3


@pytest.mark.slow
def test_a_sync_run_of_two_learners_restarts_the_group_when_a_rank_is_lost(ray_instance, tmp_path):
    """--auto-resume: rank 1 is killed after the first epoch; the whole group is replaced, every
    rank loads the last checkpoint (the ranks' versions are checked at every update), and the
    run ends. (Exactness of a resume: the test above, and tests/test_faults.py.)"""
    from learner.driver import Driver

    driver = Driver(group_config(tmp_path, **{"run.auto_resume": True}))
    killer = kill_rank_during(driver, rank=1, after_epochs=1)
    history = driver.run()
    killer.join(timeout=30)
    assert driver.resumes == 1
    assert [h["epoch"] for h in history] == [0, 1]
    assert [h["policy_version"] for h in history] == [0, 1]
    assert all(np.isfinite(h["loss"]) and h["samples"] == 8 for h in history)
    assert (tmp_path / LORA).is_file()
    assert checkpoint.latest(tmp_path).epoch == 2  # rank 0 wrote the one checkpoint a save
    assert json.loads((tmp_path / "config.json").read_text())["system"]["num_learners"] == 2


@pytest.mark.slow
def test_an_async_run_of_two_learners(ray_instance, tmp_path):
    from learner.driver import train

    config = group_config(tmp_path, **{"system.mode": "async", "run.save_every": 0})
    history = train(config)
    assert [h["policy_version"] for h in history] == [0, 1]
    assert all(h["staleness_max"] <= config.system.max_staleness for h in history)
    assert assert_accounting(tmp_path)["batches_trained"] == 2 * 2
