"""The learner's update on stale (async) batches: decoupled PPO's anchors and clipping, and
several denoising steps trained in one UNet call, in one process (no Ray)."""

import copy

import numpy as np
import pytest
import torch
from learners import make_learner, small_config

from ddpo.trajectory import Trajectory
from learner import losses


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
        # Float order alone: up to 2e-5 on the first step, 1.2e-4 on the second (at 1 thread;
        # 9e-5 at 2). A wrong scale or a wrong pairing of rows and steps is off by far more.
        assert (a - b).norm() <= 3e-4 * b.norm()
    for key in ("approx_kl", "is_weight", "decoupled_frac", "clipfrac"):
        assert metrics_3[key] == pytest.approx(metrics_1[key], rel=1e-4, abs=1e-9), key
    assert 0 < metrics_1["clipfrac"] and 0 < metrics_1["decoupled_frac"] < 1  # both at work
    for key in weights_1:  # AdamW's steps (lr 1e-3 each) agree to within 5% of a step (one
        # weight of 256 in a tensor moved 2% of a step apart at 1 thread)
        torch.testing.assert_close(weights_3[key], weights_1[key], rtol=0, atol=5e-5)
