"""The learner's update on real trajectories of the tiny model, in one process (no Ray); stale
batches are in test_learner_stale.py."""

import dataclasses
import json
from functools import partial

import numpy as np
import pytest
import torch
from learners import make_learner, small_config

from ddpo.config import ConfigError, SampleConfig, override
from ddpo.trajectory import Trajectory
from learner.driver import train
from learner.wiring import InProcess


@pytest.mark.parametrize("algorithm", ["ddpo_is", "ddpo_sf", "rwr", "sparse_rwr"])
def test_update_moves_weights_and_bumps_version(tiny_pipe, algorithm):
    config = small_config(algorithm)
    learner = make_learner(tiny_pipe, config)
    prompts = [config.prompts[i % len(config.prompts)] for i in range(8)]
    batches = [
        learner.policy.sample(prompts[:4], [0, 1, 2, 3], batch_id="0-0"),
        learner.policy.sample(prompts[4:], [4, 5, 6, 7], batch_id="0-1"),
    ]
    rewards = np.linspace(-1, 1, 8).astype(np.float32)
    _, before = learner.weights()
    metrics = learner.update(rewards, rewards, *batches)
    version, after = learner.weights()
    assert version == 1 and metrics["policy_version"] == 1
    assert np.isfinite(metrics["loss"])
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if algorithm == "ddpo_is":
        # First minibatch is on-policy (ratio 1), so the KL is tiny but the loss is -mean(A).
        assert 0 <= metrics["clipfrac"] <= 1 and metrics["approx_kl"] >= 0


def test_an_optimizer_step_with_a_non_finite_gradient_is_skipped_and_counted(tiny_pipe):
    """A log-prob that overflowed (seen in async runs: a stale sample far off the policy, on a
    denoising step with a small sigma) makes its minibatch's gradient NaN. That step is skipped:
    the weights and AdamW's moments stay finite, and the update's other step is still taken."""
    config = small_config()
    learner = make_learner(tiny_pipe, config)
    prompts = [config.prompts[i % len(config.prompts)] for i in range(8)]
    batches = [
        learner.policy.sample(prompts[:4], [0, 1, 2, 3], batch_id="0-0"),
        learner.policy.sample(prompts[4:], [4, 5, 6, 7], batch_id="0-1"),
    ]
    original, calls = learner.policy.log_prob_and_kl, []

    def first_call_overflows(*args, **kwargs):
        log_prob, kl = original(*args, **kwargs)
        calls.append(1)
        return (log_prob * float("nan") if len(calls) == 1 else log_prob), kl

    learner.policy.log_prob_and_kl = first_call_overflows
    _, before = learner.weights()
    rewards = np.linspace(-1, 1, 8).astype(np.float32)
    metrics = learner.update(rewards, rewards, *batches)
    tensors, _ = learner.state()
    assert metrics["skipped_steps"] == 1  # of the update's two (8 samples, minibatches of 4)
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k != "rng.generator")
    _, after = learner.weights()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the second step
    assert learner.update(rewards, rewards, *[
        learner.policy.sample(prompts[:4], [8, 9, 10, 11], batch_id="1-0", policy_version=1),
        learner.policy.sample(prompts[4:], [12, 13, 14, 15], batch_id="1-1", policy_version=1),
    ])["skipped_steps"] == 0  # fmt: skip


@pytest.mark.parametrize("target_kl, steps", [(1e-12, 1), (0.0, 4), (1e6, 4)])
def test_target_kl_ends_an_update_before_a_step_that_moved_too_far(tiny_pipe, target_kl, steps):
    """8 samples in minibatches of 4, two inner epochs: four optimizer steps. With a target the
    second step's minibatch surely exceeds (1e-12), the update takes its first step alone and
    ends: its weights are those of a learner whose optimizer took the first step and ignored
    the rest, and no gradient is left over. Off (0), or far above any move (1e6), all four."""
    config = small_config(learning_rate=3e-2, num_inner_epochs=2, target_kl=target_kl)
    prompts = [config.prompts[i % len(config.prompts)] for i in range(8)]
    rewards = np.linspace(-1, 1, 8).astype(np.float32)
    learners = [make_learner(tiny_pipe, config) for _ in range(2)]
    reference = learners[1]
    reference.config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, target_kl=0.0)
    )
    taken = [[], []]
    for learner, counter in zip(learners, taken, strict=True):
        step = learner.optimizer.step
        learner.optimizer.step = lambda *a, step=step, counter=counter: (
            counter.append(1) or (step(*a) if len(counter) <= steps else None)
        )
    batches = [
        learners[0].policy.sample(prompts[:4], [0, 1, 2, 3], batch_id="0-0"),
        learners[0].policy.sample(prompts[4:], [4, 5, 6, 7], batch_id="0-1"),
    ]
    metrics = [learner.update(rewards, rewards, *batches) for learner in learners]
    assert len(taken[0]) == steps and len(taken[1]) == 4
    assert metrics[0]["early_stopped"] == float(steps == 1) and metrics[1]["early_stopped"] == 0
    (_, ours), (_, theirs) = learners[0].weights(), learners[1].weights()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(p.grad is None for p in learners[0].policy.trainable_parameters())


def test_zero_learning_rate_leaves_weights(tiny_pipe):
    config = small_config(learning_rate=0.0)
    learner = make_learner(tiny_pipe, config)
    batch = learner.policy.sample(list(config.prompts[:4]), [0, 1, 2, 3])
    _, before = learner.weights()
    learner.update(np.array([1, -1, 1, -1.0]), np.zeros(4), batch)
    _, after = learner.weights()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_timestep_fraction_and_accumulation(tiny_pipe):
    config = small_config(timestep_fraction=0.5, gradient_accumulation_steps=2)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=2))
    learner = make_learner(tiny_pipe, config)
    calls = []
    original = learner.policy.log_prob_and_kl
    learner.policy.log_prob_and_kl = lambda *a, **k: calls.append(a[2]) or original(*a, **k)
    steps = []
    learner._optimizer_step = lambda: steps.append(1) or 0.0
    batch = learner.policy.sample(list(config.prompts[:4]), [0, 1, 2, 3])
    learner.update(np.array([1, -1, 1, -1.0]), np.zeros(4), batch)
    # 4 samples in minibatches of 2 -> 2 minibatches x (4 steps x 0.5) log-prob calls, 1 optimizer step.
    assert len(calls) == 4 and len(steps) == 1


def test_in_process_run_writes_run_directory(tmp_path):
    config = override(small_config(), {"run.dir": tmp_path})
    history = train(config, InProcess())
    assert [h["epoch"] for h in history] == [0, 1]
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == history and all(h["samples"] == 8 for h in history)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["task"] == "compressibility" and saved["sample"]["num_steps"] == 4
    for name in ("grid_start.png", "grid_end.png", "lora/pytorch_lora_weights.safetensors"):
        assert (tmp_path / name).is_file()
    evals = [json.loads(s) for s in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert evals[0]["kl_base"] == 0.0  # LoRA's B starts at 0: the base model, exactly
    assert evals[-1]["kl_base"] > 0
    # Held-out prompts are scored at every evaluation, never trained on.
    heldout = [e["heldout"] for e in evals]
    assert all(h["samples"] == 4 and len(h["rewards"]) == 4 for h in heldout)
    assert heldout[0]["kl_base"] == 0.0 and heldout[-1]["kl_base"] > 0
    samples = (tmp_path / "samples.jsonl").read_text().splitlines()
    trained = {json.loads(s)["prompt"] for s in samples}
    assert trained and not trained & set(config.heldout_prompts)


def test_a_batch_is_never_trained_twice(tiny_pipe):
    config = small_config()
    learner = make_learner(tiny_pipe, config)
    batch = learner.policy.sample(list(config.prompts[:4]), [0, 1, 2, 3], batch_id="0-7")
    learner.update(np.array([1, -1, 1, -1.0]), np.zeros(4), batch)
    with pytest.raises(ValueError, match="already trained"):
        learner.update(np.array([1, -1, 1, -1.0]), np.zeros(4), batch)


def assert_lr_follows_torch(learner, config, make_schedule, updates: int) -> None:
    """Each update's learning rate equals the torch scheduler's over as many steps."""
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.train.learning_rate)
    schedule = make_schedule(reference)
    prompts = list(config.prompts[:4])
    for version in range(updates):
        batch = learner.policy.sample(prompts, [0, 1, 2, 3], batch_id=f"{version}-0")
        learner.update(np.array([1, -1, 1, -1.0]), np.zeros(4), batch)
        assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(
            reference.param_groups[0]["lr"]
        )
        reference.step()
        schedule.step()


def test_cosine_schedule_follows_torch(tiny_pipe):
    """Each update's learning rate is torch's CosineAnnealingLR over the run's epochs, by version."""
    config = override(small_config(lr_schedule="cosine"), {"run.epochs": 4})
    learner = make_learner(tiny_pipe, config)
    cosine = partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=4)
    assert_lr_follows_torch(learner, config, cosine, updates=4)
    assert learner.learning_rate() == pytest.approx(0.0, abs=1e-12)


def test_warmup_follows_torch_linear_ramp(tiny_pipe):
    """warmup_updates=N: torch's LinearLR from 1/(N+1) to the full rate over N steps."""
    config = small_config(warmup_updates=3)
    learner = make_learner(tiny_pipe, config)
    ramp = partial(torch.optim.lr_scheduler.LinearLR, start_factor=1 / 4, total_iters=3)
    assert_lr_follows_torch(learner, config, ramp, updates=5)
    assert learner.learning_rate() == config.train.learning_rate
    with pytest.raises(ConfigError, match="warmup_updates=-1"):
        small_config(warmup_updates=-1)


def test_kl_penalty_pulls_the_policy_back_to_the_base_model(tiny_pipe):
    """With zero advantages the only gradient is kl_coef * KL to the base: one update lowers it.

    Adam's first step moves every weight by about lr whatever its gradient's size, so lr stays
    small against the 0.05 the weights were moved by: at 3e-3 one draw of five overshot."""
    config = small_config(learning_rate=1e-3, kl_coef=1.0)
    learner = make_learner(tiny_pipe, config)
    g = torch.Generator().manual_seed(0)
    moved = {
        k: torch.randn(v.shape, generator=g) * 0.05
        for k, v in learner.policy.lora_state_dict().items()
    }
    learner.policy.load_lora_state_dict(moved)
    batch = learner.policy.sample(list(config.prompts[:4]), [0, 1, 2, 3])
    before = learner.policy.kl_to_base(batch)
    metrics = learner.update(np.zeros(4), np.zeros(4), batch)
    after = learner.policy.kl_to_base(batch)
    assert metrics["kl_base"] == pytest.approx(float(before.mean()), rel=1e-3)
    assert after.mean() < 0.9 * before.mean()


def test_read_only_arrays_from_the_object_store_train_without_a_warning(tiny_pipe):
    """Issue 13, finding 12: through Ray, advantages and rewards arrive read-only (the object
    store's memory); torch.as_tensor wrapped them and every learner printed NumPy's "The given
    NumPy array is not writable" warning. The update copies them."""
    import warnings

    learner = make_learner(tiny_pipe, small_config())
    got = []
    learner._policy_gradient = lambda traj, adv, *rest, **kw: got.append(adv) or {}
    b, t = 4, 2  # a made-up batch: only its sizes matter to what is tested
    batch = Trajectory(
        prompts=["a"] * b,
        prompt_embeds=torch.zeros(b, 1, 1),
        latents=torch.zeros(b, t + 1, 1, 1, 1),
        timesteps=torch.arange(t),
        log_probs=torch.zeros(b, t),
        images=np.zeros((b, 1, 1, 3), np.uint8),
        seeds=np.arange(b),
        policy_version=0,
        sampler_id=0,
        batch_id="0-0",
    )
    advantages, rewards = np.array([1, -1, 1, -1.0]), np.zeros(4)
    for array in (advantages, rewards):
        array.flags.writeable = False  # as ray.get returns them
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner.update(advantages, rewards, batch)
    assert got[0].tolist() == [1, -1, 1, -1]


def test_samplers_that_do_not_divide_the_batches(tmp_path):
    """Issue 15: 3 samplers share 4 sampler calls an epoch (2, 1, 1); the epoch is whole."""
    config = override(
        small_config(),
        {
            "run": {"epochs": 1, "dir": tmp_path},
            "system.num_samplers": 3,
            "sample": SampleConfig(num_steps=4, batch_size=2, num_batches_per_epoch=4),
        },
    )
    history = train(config, InProcess())
    assert history[0]["samples"] == 8
    samples = [json.loads(s) for s in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8
