"""DDPO-IS, DDPO-SF, RWR and the stat tracker against hand computations."""

import math

import numpy as np
import pytest
import torch

from learner import losses
from learner.stat_tracker import PerPromptStatTracker, batch_advantages


def test_is_loss_at_ratio_one_pushes_log_prob_along_advantage():
    adv = torch.tensor([2.0, -1.0, 0.5])
    old = torch.tensor([-1.3, -0.7, -2.0])
    new = old.clone().requires_grad_(True)
    loss, info = losses.ddpo_is_loss(new, old, adv, clip_range=1e-4, adv_clip_max=5.0)
    loss.backward()
    # At ratio 1: loss = mean(-A), d loss / d log_prob_i = -A_i / N.
    assert loss.item() == pytest.approx(-adv.mean().item())
    torch.testing.assert_close(new.grad, -adv / 3)
    assert info["approx_kl"].item() == 0.0 and info["clipfrac"].item() == 0.0


def test_is_loss_clipped_ratios_have_zero_gradient():
    old = torch.zeros(2)
    # ratio e^0.1 > 1 + eps with A > 0, and ratio e^-0.1 < 1 - eps with A < 0: both clipped.
    new = torch.tensor([0.1, -0.1], requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    loss, info = losses.ddpo_is_loss(new, old, adv, clip_range=0.01, adv_clip_max=5.0)
    loss.backward()
    assert torch.all(new.grad == 0)
    assert info["clipfrac"].item() == 1.0
    assert loss.item() == pytest.approx(((-1.0 * 1.01) + (1.0 * 0.99)) / 2)
    assert info["approx_kl"].item() == pytest.approx(0.5 * 0.01)


def test_is_loss_unclipped_side_keeps_gradient():
    # A > 0 and ratio below 1: the unclipped term is the max, so the gradient flows.
    new = torch.tensor([-0.1], requires_grad=True)
    loss, _ = losses.ddpo_is_loss(new, torch.zeros(1), torch.tensor([1.0]), 0.01, 5.0)
    loss.backward()
    assert new.grad.item() == pytest.approx(-math.exp(-0.1))


def test_dual_clip_caps_exploded_ratios_of_negative_advantages():
    # A < 0 with ratio e^2 = 7.4 > c = 3: capped at c|A|, no gradient; with ratio e^0.5 = 1.65 < c
    # the unclipped term stays (gradient |A| r); A > 0 with a huge ratio is PPO-clipped as before.
    new = torch.tensor([2.0, 0.5, 2.0], requires_grad=True)
    adv = torch.tensor([-1.0, -1.0, 1.0])
    loss, info = losses.ddpo_is_loss(new, torch.zeros(3), adv, 0.1, 5.0, dual_clip=3.0)
    loss.backward()
    assert loss.item() == pytest.approx((3.0 + math.exp(0.5) - 1.1) / 3)
    assert new.grad.tolist() == pytest.approx([0.0, math.exp(0.5) / 3, 0.0])
    assert info["dualclipfrac"].item() == pytest.approx(1 / 3)
    # Off (the default), the first term is -A r = e^2 with gradient e^2 / 3.
    new.grad = None
    loss, info = losses.ddpo_is_loss(new, torch.zeros(3), adv, 0.1, 5.0)
    loss.backward()
    assert new.grad[0].item() == pytest.approx(math.exp(2.0) / 3)
    assert info["dualclipfrac"].item() == 0.0


def test_decoupled_loss_clips_around_the_proximal_policy_within_the_clip_range():
    """Hilton et al. 2021 by hand, where pi_prox is within the clip range of pi_behaviour: the
    clip is around pi_prox and each term is scaled by w = pi_prox / pi_behaviour (no gradient).
    Where it has left that range, the term is plain PPO's, clipped around pi_behaviour."""
    eps = 0.01
    behaviour = torch.zeros(5)
    prox = torch.tensor([0.001, -0.005, 0.5, -0.5, 0.5])  # w - 1: 0.001, -0.005, then outside
    new = torch.tensor([0.001, -0.0045, 0.6, -0.5, 0.5], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0])
    loss, info = losses.ddpo_is_loss(
        new, prox, adv, clip_range=eps, adv_clip_max=5.0, behaviour_log_prob=behaviour
    )
    loss.backward()
    w = torch.exp(prox[:2])
    r_prox = torch.exp(new.detach()[:2] - prox[:2])  # 1 and e^0.0005: inside the clip
    r_behaviour = torch.exp(new.detach()[2:])  # e^0.6, e^-0.5, e^0.5: all outside it
    terms = [
        -w[0] * r_prox[0],  # A > 0, unclipped
        w[1] * r_prox[1],  # A < 0, unclipped
        -(1 + eps),  # A > 0 and r > 1 + eps: clipped, no gradient
        1 - eps,  # A < 0 and r < 1 - eps: clipped, no gradient
        r_behaviour[2],  # A < 0 and r > 1 + eps: the pessimistic term, unclipped
    ]
    assert loss.item() == pytest.approx(float(sum(terms)) / 5)
    expected_grad = [-w[0] * r_prox[0] / 5, w[1] * r_prox[1] / 5, 0.0, 0.0, r_behaviour[2] / 5]
    assert new.grad.tolist() == pytest.approx([float(g) for g in expected_grad])
    assert info["decoupled_frac"].item() == pytest.approx(0.4)
    assert info["is_weight_max"].item() == pytest.approx(math.exp(0.5))
    # The last three are plain PPO's terms on the same samples.
    plain, _ = losses.ddpo_is_loss(new.detach()[2:], behaviour[2:], adv[2:], eps, 5.0)
    assert plain.item() == pytest.approx(float(sum(terms[2:])) / 3)


def test_decoupled_loss_equals_plain_on_fresh_samples():
    old = torch.tensor([-1.3, -0.7, -2.0])
    new = old + torch.tensor([1e-3, -2e-3, 5e-5])
    adv = torch.tensor([2.0, -1.0, 0.5])
    plain, _ = losses.ddpo_is_loss(new, old, adv, 1e-3, 5.0, dual_clip=3.0)
    decoupled, info = losses.ddpo_is_loss(new, old, adv, 1e-3, 5.0, 3.0, behaviour_log_prob=old)
    assert torch.equal(plain, decoupled) and info["is_weight"].item() == 1.0


def test_is_loss_clips_advantages():
    zeros = torch.zeros(2)
    loss, _ = losses.ddpo_is_loss(zeros, zeros, torch.tensor([10.0, -20.0]), 1e-4, adv_clip_max=5.0)
    assert loss.item() == pytest.approx((-5.0 + 5.0) / 2)
    loss, _ = losses.ddpo_is_loss(zeros, zeros, torch.tensor([10.0, 1.0]), 1e-4, adv_clip_max=5.0)
    assert loss.item() == pytest.approx(-(5.0 + 1.0) / 2)


def test_sf_loss_by_hand():
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss = losses.ddpo_sf_loss(lp, torch.tensor([3.0, -9.0]), adv_clip_max=5.0)
    assert loss.item() == pytest.approx(-(3 * -1.0 + -5.0 * -2.0) / 2)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([-1.5, 2.5]))


def test_rwr_weights_by_hand():
    r = torch.tensor([0.0, 1.0, 2.0])
    w = losses.rwr_weights(r, beta=2.0)
    e = np.exp([0.0, 2.0, 4.0])
    np.testing.assert_allclose(w.numpy(), e / e.sum(), rtol=1e-6)


def test_sparse_rwr_keeps_top_quantile():
    r = torch.arange(10, dtype=torch.float32)
    w = losses.sparse_rwr_weights(r, quantile=0.75)  # quantile of 0..9 at 0.75 is 6.75
    expected = np.array([0] * 7 + [1 / 3] * 3)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)


def test_weighted_denoising_loss_by_hand():
    pred = torch.zeros(2, 1, 2, 2)
    noise = torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    loss = losses.weighted_denoising_loss(pred, noise, torch.tensor([0.25, 0.75]))
    assert loss.item() == pytest.approx(0.25 * 1 + 0.75 * 4)


def test_stat_tracker_by_hand():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    prompts = ["a", "a", "b", "b", "a"]
    rewards = np.array([1.0, 2.0, 10.0, 20.0, 3.0])
    adv = tracker.update(prompts, rewards)
    # "a" has 3 rewards >= min_count: its own stats; "b" has 2: the batch's stats.
    a_mean, a_std = 2.0, np.std([1, 2, 3])
    b_mean, b_std = rewards.mean(), rewards.std()
    expected = [
        (1 - a_mean) / a_std,
        (2 - a_mean) / a_std,
        (10 - b_mean) / b_std,
        (20 - b_mean) / b_std,
        (3 - a_mean) / a_std,
    ]
    np.testing.assert_allclose(adv, expected, rtol=1e-5)

    # Second batch: "b" now has 3 rewards (buffer), "a"'s buffer drops its oldest (size 4).
    adv = tracker.update(["a", "a", "b"], np.array([4.0, 5.0, 30.0]))
    a_buf, b_buf = np.array([2, 3, 4, 5.0]), np.array([10, 20, 30.0])
    expected = [
        (4 - a_buf.mean()) / a_buf.std(),
        (5 - a_buf.mean()) / a_buf.std(),
        (30 - b_buf.mean()) / b_buf.std(),
    ]
    np.testing.assert_allclose(adv, expected, rtol=1e-5)
    assert tracker.state_dict() == {"a": [2.0, 3.0, 4.0, 5.0], "b": [10.0, 20.0, 30.0]}


def test_stat_tracker_rejects_mismatched_lengths_and_unreachable_min_count():
    with pytest.raises(ValueError, match="min_count"):
        PerPromptStatTracker(buffer_size=2, min_count=3)
    with pytest.raises(ValueError, match="2 prompts but 3 rewards"):
        PerPromptStatTracker(4, 2).update(["a", "b"], np.zeros(3))


def test_batch_advantages():
    r = np.array([1.0, 2.0, 3.0, 6.0])
    np.testing.assert_allclose(batch_advantages(r), (r - 3.0) / r.std(), rtol=1e-5)
