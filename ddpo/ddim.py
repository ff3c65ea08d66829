"""One DDIM step as a Gaussian policy: the previous latent and its log-probability.

With eta > 0 the DDIM update x_t -> x_{t-1} is a Gaussian whose mean and variance follow from the
noise prediction (Song et al. 2021, eq. 12), so each denoising step is an action with a tractable
log-likelihood (Black et al. 2023, DDPO, sec. 4.3). The log-prob is **averaged** over the latent's
dimensions, as in the DDPO reference implementation; the PPO clip range is tuned to that scale.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler


def _gather(values: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[index] shaped [B, 1, 1, ...] to broadcast against `like` [B, ...]."""
    out = values.to(like.device)[index.to(like.device)].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def ddim_step_mean_std(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    eta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian of one DDIM step x_t -> x_{t-1}: its mean [B, C, H, W] and its standard
    deviation [B, 1, 1, 1] (one per sample: it depends on t alone). Arguments as in
    `ddim_step_with_log_prob`."""
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    if eta <= 0:
        raise ValueError(
            f"eta={eta} makes the step deterministic and its log-prob undefined; use eta > 0"
        )
    batch = sample.shape[0]
    t = torch.as_tensor(timestep, dtype=torch.long).reshape(-1).expand(batch).cpu()
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev_t = t - step

    alphas_cumprod = scheduler.alphas_cumprod
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=alphas_cumprod.dtype)
    abar_t = _gather(alphas_cumprod, t, sample)
    abar_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], final)
    abar_prev = abar_prev.to(sample.device, sample.dtype).reshape(abar_t.shape)
    beta_t = 1 - abar_t

    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (sample - beta_t.sqrt() * model_output) / abar_t.sqrt()
        eps = model_output
    elif kind == "sample":
        x0 = model_output
        eps = (sample - abar_t.sqrt() * x0) / beta_t.sqrt()
    elif kind == "v_prediction":
        x0 = abar_t.sqrt() * sample - beta_t.sqrt() * model_output
        eps = abar_t.sqrt() * model_output + beta_t.sqrt() * sample
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    if scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)

    # sigma_t of DDIM (Song et al. eq. 16); eta = 1 gives the DDPM posterior variance.
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    std = eta * variance.sqrt()
    mean = abar_prev.sqrt() * x0 + (1 - abar_prev - std**2).clamp(min=0).sqrt() * eps
    return mean, std


def ddim_step_with_log_prob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Take one DDIM step from `sample` (x_t) and return (x_{t-1}, log p(x_{t-1} | x_t)).

    model_output: the (guided) model prediction [B, C, H, W], in the scheduler's prediction type.
    timestep: the current timestep t, an int or a [B] tensor (samples may sit at different t).
    prev_sample: if given, score this x_{t-1} instead of sampling one (used in training).
    generator: one torch.Generator per sample, so each sample's noise is independent of the batch.
    Returns prev_sample [B, C, H, W] and log_prob [B] (mean over C, H, W).
    """
    mean, std = ddim_step_mean_std(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        if generator is not None:
            noise = torch.stack(
                [torch.randn(sample.shape[1:], generator=g, dtype=sample.dtype) for g in generator]
            ).to(sample.device)
        else:
            noise = torch.randn_like(sample)
        prev_sample = mean + std * noise

    return prev_sample, gaussian_log_prob(prev_sample.detach(), mean, std)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) per dimension, then the mean over all non-batch dimensions [B]."""
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_prob.mean(dim=tuple(range(1, x.ndim)))


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, std^2) || N(mean_q, std^2)) per sample [B], averaged over the non-batch
    dimensions like the log-probs: two DDIM steps from the same x_t share their variance, so the
    KL is closed form, (mean_p - mean_q)^2 / (2 std^2)."""
    kl = (mean_p - mean_q) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, mean_p.ndim)))
