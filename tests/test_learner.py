"""The learner's update on real trajectories of the tiny model, in one process (no Ray)."""

import copy
import dataclasses
import json
from functools import partial

import numpy as np
import pytest
import torch

from ddpo.config import ConfigError, SampleConfig, StatTrackerConfig, TrainConfig, override
from ddpo.policy import Policy
from ddpo.presets import task_config
from ddpo.trajectory import Trajectory
from learner import losses
from learner.driver import train
from learner.learner import Learner
from learner.wiring import InProcess


def small_config(algorithm="ddpo_is", learning_rate=1e-3, **train):
    base = task_config("compressibility", "tiny")
    return dataclasses.replace(
        base,
        run=dataclasses.replace(base.run, epochs=2),
        sample=SampleConfig(num_steps=4, batch_size=4, num_batches_per_epoch=2),
        train=TrainConfig(algorithm=algorithm, learning_rate=learning_rate, batch_size=4, **train),
        stat_tracker=StatTrackerConfig(buffer_size=4, min_count=2),
        grid_prompts=2,
        grid_seeds=2,
    )


def make_learner(tiny_pipe, config):
    s = config.sample
    policy = Policy(
        copy.deepcopy(tiny_pipe), s.num_steps, s.guidance_scale, s.eta, config.train.lora_rank
    )
    return Learner(config, policy=policy)


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


def test_decoupled_ppo_clips_a_stale_batch_around_the_current_weights(tiny_pipe):
    """A batch one version stale, in one minibatch, two passes: decoupled PPO recomputes its
    log-probs under the current weights first and, where those are still within the clip range
    of the sampler's, clips around them; at lr 1e-3 the previous update left some terms outside
    the range, and those are plain PPO's. At the starting weights a term within the range has
    the same gradient either way (w times its score), so the two part only in the second pass,
    where their clip windows differ."""
    metrics, weights = {}, {}
    for decoupled in (False, True):
        config = small_config(
            learning_rate=1e-3, clip_range=1e-3, decoupled=decoupled, num_inner_epochs=2
        )
        learner = make_learner(tiny_pipe, config)
        prompts = list(config.prompts[:4])
        fresh = learner.policy.sample(prompts, [0, 1, 2, 3], batch_id="0-0")
        stale = learner.policy.sample(prompts, [4, 5, 6, 7], batch_id="0-1")
        first = learner.update(np.array([1, -1, 1, -1.0]), np.zeros(4), fresh)
        metrics[decoupled] = learner.update(np.array([1, -1, 1, -1.0]), np.zeros(4), stale)
        weights[decoupled] = learner.weights()[1]
        assert metrics[decoupled]["staleness_max"] == 1
    assert first["is_weight"] == 1.0 and first["decoupled_frac"] == 1.0  # fresh: plain PPO
    assert 0.5 < metrics[True]["decoupled_frac"] < 1.0
    assert any(not torch.equal(weights[True][k], weights[False][k]) for k in weights[True])
    assert "is_weight" not in metrics[False] and "decoupled_frac" not in metrics[False]


def test_decoupled_ppo_anchors_every_stale_term_at_the_starting_weights(tiny_pipe, monkeypatch):
    """Two passes of two minibatches on half the steps, one batch fresh and one stale: every
    term of a stale sample is clipped around its log-prob under the weights the update started
    from, whether the learner took it from training's own forward pass (before the first
    optimizer step) or computed it up front; fresh samples keep their sampler's log-probs. The
    reference is a frozen copy of the starting policy, fed the very inputs of each term."""
    config = small_config(
        learning_rate=3e-2, decoupled=True, num_inner_epochs=2, timestep_fraction=0.5
    )
    learner = make_learner(tiny_pipe, config)
    prompts = list(config.prompts[:4])
    first = learner.policy.sample(prompts, [0, 1, 2, 3], batch_id="0-0")
    stale = learner.policy.sample(prompts, [4, 5, 6, 7], batch_id="0-1")
    learner.update(np.array([1, -1, 1, -1.0]), np.zeros(4), first)  # to version 1
    fresh = learner.policy.sample(prompts, [8, 9, 10, 11], policy_version=1, batch_id="1-0")
    start = copy.deepcopy(learner.policy)  # the proximal policy of the next update

    inputs, anchors, pairs = [], [], []
    forward, loss = learner.policy.log_prob_and_kl, losses.ddpo_is_loss
    upfront = learner._proximal_log_probs

    def record_forward(*args, **kwargs):
        if torch.is_grad_enabled():  # training's terms, not the proximal pass up front
            inputs.append(args)
        return forward(*args, **kwargs)

    def record_loss(log_prob, old_log_prob, *args, **kwargs):
        anchors.append(old_log_prob.clone())
        return loss(log_prob, old_log_prob, *args, **kwargs)

    def record_upfront(traj, needed, size):
        pairs.append(int(needed.sum()))
        return upfront(traj, needed, size)

    monkeypatch.setattr(learner.policy, "log_prob_and_kl", record_forward)
    monkeypatch.setattr(losses, "ddpo_is_loss", record_loss)
    monkeypatch.setattr(learner, "_proximal_log_probs", record_upfront)
    metrics = learner.update(np.array([1, -1, 1, -1, 1, -1, 1, -1.0]), np.zeros(8), stale, fresh)
    assert metrics["staleness_max"] == 1 and metrics["policy_version"] == 2

    # 2 passes x 2 minibatches x 2 of the 4 steps; per term the minibatch's 4 samples.
    assert len(inputs) == len(anchors) == 8
    traj = Trajectory.concat([stale, fresh])
    stale_pairs: list[set] = [set() for _ in inputs]  # each term's stale (sample, step) pairs
    for call, ((embeds, latents, timesteps, next_latents), anchor) in enumerate(
        zip(inputs, anchors, strict=True)
    ):
        with torch.no_grad():
            proximal = start.log_prob(embeds, latents, timesteps, next_latents)
        for j in range(len(latents)):
            # The term's sample and step: where its input latents sit in the trajectories.
            where = (traj.latents[:, :-1] == latents[j]).flatten(2).all(-1).nonzero()
            assert len(where) == 1
            row, step = where[0].tolist()
            if row < len(stale):  # stale: the starting weights' log-prob
                torch.testing.assert_close(anchor[j], proximal[j], rtol=0, atol=1e-5)
                stale_pairs[call].add((row, step))
            else:  # fresh: the sampler's own
                assert anchor[j] == traj.log_probs[row, step]
    # Every stale sample's 2 steps in each of the 2 passes.
    assert sum(len(p) for p in stale_pairs) == 16
    # Up front, only the pairs trained after the first optimizer step (after the first
    # minibatch: the first 2 terms) that were not trained before it.
    before = set().union(*stale_pairs[:2])
    assert pairs == [len(set().union(*stale_pairs[2:]) - before)] and before


def test_decoupled_ppo_trains_fresh_batches_bit_for_bit_as_plain(tiny_pipe):
    weights = []
    for decoupled in (False, True):
        learner = make_learner(tiny_pipe, small_config(learning_rate=3e-2, decoupled=decoupled))
        prompts = list(learner.config.prompts[:4])
        batch = learner.policy.sample(prompts, [0, 1, 2, 3], batch_id="0-0")
        learner.update(np.array([1, -1, 1, -1.0]), np.zeros(4), batch)
        weights.append(learner.weights()[1])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_steps_per_call_trains_the_same_gradient_in_fewer_calls(tiny_pipe):
    """Two passes of two minibatches on all 4 steps, one batch stale and one fresh (decoupled
    PPO's anchors, before and after the first optimizer step, come into it): steps trained 3 to
    a UNet call (a call of 3 steps and one of 1 a minibatch) give every optimizer step the
    gradient of one step a call, and the update the same metrics and weights, up to the order
    of float sums."""
    runs = {}
    for per_call in (1, 3):
        config = small_config(
            learning_rate=1e-3,
            clip_range=1e-3,
            decoupled=True,
            num_inner_epochs=2,
            steps_per_call=per_call,
        )
        learner = make_learner(tiny_pipe, config)
        prompts = list(config.prompts[:4])
        first = learner.policy.sample(prompts, [0, 1, 2, 3], batch_id="0-0")
        stale = learner.policy.sample(prompts, [4, 5, 6, 7], batch_id="0-1")
        learner.update(np.array([1, -1, 1, -1.0]), np.zeros(4), first)
        fresh = learner.policy.sample(prompts, [8, 9, 10, 11], policy_version=1, batch_id="1-0")
        grads, calls = [], []
        forward, step = learner.policy.log_prob_and_kl, learner._optimizer_step

        def record_step(step=step, grads=grads, learner=learner):
            grads.append([p.grad.clone() for p in learner.policy.trainable_parameters()])
            return step()

        def record_forward(*args, forward=forward, calls=calls, **kwargs):
            if torch.is_grad_enabled():  # training's calls, not the proximal pass up front
                calls.append(len(args[1]))
            return forward(*args, **kwargs)

        learner._optimizer_step = record_step
        learner.policy.log_prob_and_kl = record_forward
        advantages = np.array([1, -1, 1, -1, 1, -1, 1, -1.0])
        metrics = learner.update(advantages, np.zeros(8), stale, fresh)
        runs[per_call] = grads, calls, metrics, learner.weights()[1]
    (grads_1, calls_1, metrics_1, weights_1), (grads_3, calls_3, metrics_3, weights_3) = (
        runs[1],
        runs[3],
    )
    # 2 passes x 2 minibatches of 4 samples: 4 calls of 4 latents, or a call of 12 and one of 4.
    assert calls_1 == [4] * 16 and calls_3 == [12, 4] * 4
    assert len(grads_1) == len(grads_3) == 4
    for ours, theirs in zip(grads_3, grads_1, strict=True):  # each optimizer step's gradient
        a, b = (torch.cat([g.flatten() for g in grads]) for grads in (ours, theirs))
        assert (a - b).norm() <= 1e-4 * b.norm()
    for key in ("approx_kl", "is_weight", "decoupled_frac", "clipfrac"):
        assert metrics_3[key] == pytest.approx(metrics_1[key], rel=1e-4, abs=1e-9), key
    assert 0 < metrics_1["clipfrac"] and 0 < metrics_1["decoupled_frac"] < 1  # both at work
    for key in weights_1:  # AdamW's steps (lr 1e-3 each) agree to within 1% of a step
        torch.testing.assert_close(weights_3[key], weights_1[key], rtol=0, atol=1e-5)


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

    from ddpo.trajectory import Trajectory

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
