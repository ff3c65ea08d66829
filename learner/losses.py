"""The DDPO objectives, as pure functions of log-probs, advantages and rewards.

Provenance: DDPO-IS and DDPO-SF from Black et al. 2023 (sec. 4.2-4.3, with PPO's clipping from
Schulman et al. 2017); RWR and sparse RWR as the paper's baselines (sec. 4.1).
"""

from __future__ import annotations

import torch

IS_WEIGHT_MAX = 2.0
"""Decoupled PPO's weight pi_prox / pi_behaviour is truncated here. In decoupled runs through Ray
no term's weight exceeded 1.007, spikes of approx_kl included, so the truncation never acted
(BENCHMARKS.md, "Decoupled PPO through Ray, a third draw"): the log-probs are averaged over the
latent's dimensions, and one version of lag moves that average little."""


def ddpo_is_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip_max: float,
    dual_clip: float = 0.0,
    behaviour_log_prob: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped importance-sampling loss over a batch of transitions [B].

    loss = mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))), r = exp(log_prob - old_log_prob);
    with dual_clip = c > 1, a term with A < 0 is also capped at -c A (dual-clip PPO, Ye et al.
    2020): the pessimistic max lets -A r grow with r without bound, so off-policy samples whose
    ratio exploded (async, stale batches) would otherwise dominate the update.

    Decoupled PPO (Hilton et al. 2021): given the log-prob under the policy that sampled the
    transition (`behaviour_log_prob`), `old_log_prob` is the proximal policy's (the learner's
    weights when the update began), the clip is taken around it, and each term is weighted by
    w = pi_prox / pi_behaviour (a constant, no gradient). A stale sample then has its full clip
    range to move in, where plain PPO spends it on the versions the policy already moved since
    sampling. On fresh samples the two log-probs are equal and the loss is plain PPO's.
    w is truncated at IS_WEIGHT_MAX, as V-trace truncates its weights.
    Returns the loss and detached diagnostics (approx_kl, clipfrac, dualclipfrac; with a
    behaviour log-prob also is_weight and is_weight_max, before truncation).
    """
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    capped = (
        (advantages < 0) & (ratio > dual_clip) if dual_clip > 1 else torch.zeros_like(ratio) > 0
    )
    per_sample = torch.where(capped, -dual_clip * advantages, per_sample)
    info = {}
    if behaviour_log_prob is not None:
        weight = torch.exp(old_log_prob - behaviour_log_prob).detach()
        per_sample = per_sample * weight.clamp(max=IS_WEIGHT_MAX)
        info = {"is_weight": weight.mean(), "is_weight_max": weight.max()}
    loss = per_sample.mean()
    with torch.no_grad():
        info |= {
            "approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "dualclipfrac": capped.float().mean(),
        }
    return loss, info


def ddpo_sf_loss(
    log_prob: torch.Tensor, advantages: torch.Tensor, adv_clip_max: float
) -> torch.Tensor:
    """Score-function (REINFORCE) loss: -mean(A log_prob); valid only on-policy."""
    return -(advantages.clamp(-adv_clip_max, adv_clip_max) * log_prob).mean()


def rwr_weights(rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """Reward-weighted regression weights exp(beta r) / sum exp(beta r) over the batch."""
    return torch.softmax(beta * rewards.double(), dim=0).to(rewards.dtype)


def sparse_rwr_weights(rewards: torch.Tensor, quantile: float) -> torch.Tensor:
    """Weight 1 for samples with reward >= the batch's `quantile`, else 0, normalised."""
    threshold = torch.quantile(rewards.double(), quantile).to(rewards.dtype)
    keep = (rewards >= threshold).to(rewards.dtype)
    return keep / keep.sum()


def weighted_denoising_loss(
    predicted_noise: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """sum_i w_i ||eps_theta(x_t^i) - eps^i||^2 / dims: the diffusion loss weighted per sample."""
    per_sample = ((predicted_noise - noise) ** 2).mean(dim=tuple(range(1, noise.ndim)))
    return (weights * per_sample).sum()
