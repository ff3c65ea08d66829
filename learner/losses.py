"""The DDPO objectives, as pure functions of log-probs, advantages and rewards.

Provenance: DDPO-IS and DDPO-SF from Black et al. 2023 (sec. 4.2-4.3, with PPO's clipping from
Schulman et al. 2017); RWR and sparse RWR as the paper's baselines (sec. 4.1).
"""

from __future__ import annotations

import torch


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

    Decoupled PPO (Hilton et al. 2021), within the clip range: given the log-prob under the
    policy that sampled the transition (`behaviour_log_prob`), `old_log_prob` is the proximal
    policy's (the learner's weights when the update began). Where the proximal policy is still
    within the clip range of the behaviour policy (|w - 1| <= eps, w = pi_prox / pi_behaviour),
    the clip is taken around the proximal log-prob and the term weighted by w (a constant, no
    gradient): every stale term has eps to move either way from where the update starts, where
    plain PPO's room depends on how the policy has moved on it since sampling. Where the
    proximal policy has left that range, the term is plain PPO's, clipped around the behaviour
    log-prob.
    Decoupling those too let runs through Ray diverge (BENCHMARKS.md, "Decoupled PPO through
    Ray, a third draw"). Where a term's advantage favours the way the policy has already moved
    on it since sampling, by more than eps, plain PPO's clip stops it; decoupled PPO's clip,
    centred on the proximal policy, lets it move by eps more, and by eps more again in the next
    update. That is the likely reason, not a proven one.
    On fresh samples w = 1 and the loss is plain PPO's.
    Returns the loss and detached diagnostics (approx_kl against `old_log_prob`, clipfrac of the
    ratios as clipped, dualclipfrac; with a behaviour log-prob also is_weight and is_weight_max,
    the mean and largest w, and decoupled_frac, the fraction of terms within the range).
    """
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    anchor, weight, info = old_log_prob, None, {}
    if behaviour_log_prob is not None:
        w = torch.exp(old_log_prob - behaviour_log_prob).detach()
        inside = (w - 1.0).abs() <= clip_range
        anchor = torch.where(inside, old_log_prob, behaviour_log_prob)
        weight = torch.where(inside, w, torch.ones_like(w))
        info = {
            "is_weight": w.mean(),
            "is_weight_max": w.max(),
            "decoupled_frac": inside.float().mean(),
        }
    ratio = torch.exp(log_prob - anchor)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    capped = (
        (advantages < 0) & (ratio > dual_clip) if dual_clip > 1 else torch.zeros_like(ratio) > 0
    )
    per_sample = torch.where(capped, -dual_clip * advantages, per_sample)
    if weight is not None:
        per_sample = per_sample * weight
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
