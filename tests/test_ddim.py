"""The DDIM step's log-prob against torch.distributions and diffusers' own DDIM step."""

import pytest
import torch

from ddpo import ddim
from ddpo.ddim import ddim_step_with_log_prob
from ddpo.tiny.build import sd14_scheduler


def reference_step(scheduler, eps, t, x, eta, noise):
    """Mean and std of the step from diffusers' DDIMScheduler.step (an independent implementation)."""
    mean = scheduler.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    std = eta * scheduler._get_variance(t, prev_t) ** 0.5
    sampled = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
    return mean, std, sampled


@pytest.mark.parametrize("num_steps", [10, 50])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_log_prob_matches_normal(num_steps, eta):
    scheduler = sd14_scheduler()
    scheduler.set_timesteps(num_steps)
    gen = torch.Generator().manual_seed(0)
    # first, a middle and the last step (the last has the smallest sigma)
    for t in scheduler.timesteps[[0, num_steps // 2, -1]]:
        x = torch.randn(3, 4, 8, 8, generator=gen)
        eps = torch.randn(3, 4, 8, 8, generator=gen)
        noise = torch.randn(3, 4, 8, 8, generator=gen)
        mean, std, sampled = reference_step(scheduler, eps, int(t), x, eta, noise)
        expected = torch.distributions.Normal(mean, std).log_prob(sampled).mean(dim=(1, 2, 3))

        prev, log_prob = ddim_step_with_log_prob(scheduler, eps, t, x, eta=eta, prev_sample=sampled)
        assert torch.equal(prev, sampled)
        torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(log_prob).all()


def test_sampled_step_matches_diffusers_and_is_seeded():
    scheduler = sd14_scheduler()
    scheduler.set_timesteps(20)
    t = scheduler.timesteps[5]
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    prev, _ = ddim_step_with_log_prob(scheduler, eps, t, x, generator=gens)
    noise = torch.stack(
        [torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    )
    _, _, expected = reference_step(scheduler, eps, int(t), x, 1.0, noise)
    torch.testing.assert_close(prev, expected, rtol=1e-5, atol=1e-6)


def test_per_sample_timesteps_equal_separate_calls():
    scheduler = sd14_scheduler()
    scheduler.set_timesteps(20)
    ts = scheduler.timesteps[[0, 7, 19]]
    x, eps, nxt = (torch.randn(3, 4, 8, 8) for _ in range(3))
    _, joint = ddim_step_with_log_prob(scheduler, eps, ts, x, prev_sample=nxt)
    for i, t in enumerate(ts):
        _, single = ddim_step_with_log_prob(
            scheduler, eps[i : i + 1], t, x[i : i + 1], prev_sample=nxt[i : i + 1]
        )
        torch.testing.assert_close(joint[i : i + 1], single)


def test_default_diffusers_config_would_be_nan_but_sd14_is_finite():
    """Why the SD 1.4 scheduler settings matter: the last step's sigma must not be 0."""
    from diffusers import DDIMScheduler

    default = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    default.set_timesteps(10)
    t = default.timesteps[-1]
    x = torch.randn(1, 4, 8, 8)
    _, lp = ddim_step_with_log_prob(default, torch.randn_like(x), t, x, prev_sample=x)
    assert not torch.isfinite(lp).all()
    sd = sd14_scheduler()
    sd.set_timesteps(10)
    _, lp = ddim_step_with_log_prob(sd, torch.randn_like(x), sd.timesteps[-1], x, prev_sample=x)
    assert torch.isfinite(lp).all()


def test_eta_zero_is_rejected():
    scheduler = sd14_scheduler()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_log_prob(
            scheduler, torch.zeros(1, 4, 2, 2), 1, torch.zeros(1, 4, 2, 2), eta=0.0
        )


def test_gaussian_kl_matches_torch_distributions_and_monte_carlo():
    """The closed-form step KL against torch's analytic KL and a Monte Carlo estimate."""
    g = torch.Generator().manual_seed(0)
    mean_p, mean_q = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    std = torch.tensor([0.3, 0.7, 1.5]).reshape(3, 1, 1, 1)
    p = torch.distributions.Normal(mean_p, std.expand_as(mean_p))
    q = torch.distributions.Normal(mean_q, std.expand_as(mean_q))
    analytic = torch.distributions.kl_divergence(p, q).mean(dim=(1, 2, 3))
    torch.testing.assert_close(ddim.gaussian_kl(mean_p, mean_q, std), analytic)
    x = p.sample((200_000,))
    monte_carlo = (p.log_prob(x) - q.log_prob(x)).mean(dim=(0, 2, 3, 4))
    torch.testing.assert_close(
        ddim.gaussian_kl(mean_p, mean_q, std), monte_carlo, rtol=0.02, atol=0.02
    )


def test_gaussian_kl_gradient_is_the_hand_formula():
    """d KL / d mean_p = (mean_p - mean_q) / (std^2 D): the penalty's gradient on a toy step."""
    mean_p = torch.tensor([[1.0, -2.0, 0.5]], requires_grad=True)
    mean_q, std = torch.tensor([[0.0, 1.0, 0.5]]), torch.tensor([[0.5]])
    ddim.gaussian_kl(mean_p, mean_q, std).sum().backward()
    expected = (mean_p.detach() - mean_q) / (std**2 * 3)
    torch.testing.assert_close(mean_p.grad, expected)
