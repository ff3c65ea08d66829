"""Sampling with log-probs on the tiny model, and recomputing them (the ratio-1 invariant)."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from ddpo import ddim
from ddpo.policy import ModelLoadError, Policy, load_pipeline
from ddpo.presets import task_config

PROMPTS = ["a red circle on a plain background", "a blue square on a striped background"] * 2


@pytest.fixture(scope="module")
def policy(tiny_pipe):
    return Policy(copy.deepcopy(tiny_pipe), num_steps=8, guidance_scale=5.0)


def test_sampling_is_reproducible_and_per_sample_seeded(policy):
    a = policy.sample(PROMPTS, [1, 2, 3, 4])
    b = policy.sample(PROMPTS, [1, 2, 3, 4])
    assert torch.equal(a.latents, b.latents) and np.array_equal(a.images, b.images)
    # Sample i depends on seeds[i] alone, not on its batch.
    c = policy.sample(PROMPTS[2:3], [3])
    torch.testing.assert_close(c.latents[0], a.latents[2], rtol=1e-5, atol=1e-5)
    assert a.latents.shape == (4, 9, *policy.latent_shape()) and a.log_probs.shape == (4, 8)
    assert policy.latent_shape() == (4, 16, 16)
    assert a.images.shape == (4, 32, 32, 3) and a.images.dtype == np.uint8
    assert torch.isfinite(a.log_probs).all()


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_recomputed_log_prob_equals_sampled(tiny_pipe, guidance, merged):
    policy = Policy(
        copy.deepcopy(tiny_pipe), num_steps=8, guidance_scale=guidance, lora_merged=merged
    )
    # Make the LoRA non-trivial so the test covers the adapted model, not just the base.
    state = {k: torch.randn_like(v) * 0.05 for k, v in policy.lora_state_dict().items()}
    policy.load_lora_state_dict(state)
    traj = policy.sample(PROMPTS, [5, 6, 7, 8])
    # Each sample at a different step, as the learner's shuffled minibatches are.
    steps = torch.tensor([0, 3, 7, 5])
    rows = torch.arange(4)
    with torch.no_grad():
        lp = policy.log_prob(
            traj.prompt_embeds,
            traj.latents[rows, steps],
            traj.timesteps[steps],
            traj.latents[rows, steps + 1],
        )
    ratio = torch.exp(lp - traj.log_probs[rows, steps])
    torch.testing.assert_close(ratio, torch.ones(4), rtol=0, atol=1e-6)


def test_log_prob_changes_with_weights_and_has_gradients(policy):
    traj = policy.sample(PROMPTS[:2], [1, 2])
    original = policy.lora_state_dict()
    try:
        policy.load_lora_state_dict({k: v + 0.1 for k, v in original.items()})
        lp = policy.log_prob(
            traj.prompt_embeds, traj.latents[:, 2], traj.timesteps[[2, 2]], traj.latents[:, 3]
        )
        assert not torch.allclose(lp, traj.log_probs[:, 2])
        lp.sum().backward()
        grads = [p.grad for p in policy.trainable_parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    finally:
        policy.load_lora_state_dict(original)
        for p in policy.trainable_parameters():
            p.grad = None


def test_lora_starts_as_identity(tiny_pipe):
    """peft's zero-initialised B: the adapted model samples exactly what the base model does."""
    base = copy.deepcopy(tiny_pipe)
    adapted = Policy(copy.deepcopy(tiny_pipe), num_steps=4)
    x = torch.randn(2, 4, 8, 8)
    embeds = adapted.encode_prompts(PROMPTS[:2])
    t = torch.tensor([500, 500])
    with torch.no_grad():
        torch.testing.assert_close(
            adapted.unet(x, t, embeds).sample, base.unet(x, t, embeds).sample
        )
    names = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapted.lora_state_dict()}
    assert names == {"to_q", "to_k", "to_v", "0"}  # to_out.0


def test_bad_model_paths_give_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(str(tmp_path))
    with pytest.raises(ModelLoadError, match="neither `tiny`, an existing directory, nor a hub id"):
        load_pipeline("./does/not/exist")
    with pytest.raises(ModelLoadError, match="hub id nobody/no-such-model"):
        load_pipeline("nobody/no-such-model")  # HF_HUB_OFFLINE=1 in tests: nothing is downloaded
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not load"):
        load_pipeline(str(tmp_path))


def test_kl_to_base_is_zero_at_start_and_matches_a_separate_base_model(tiny_pipe):
    policy = Policy(copy.deepcopy(tiny_pipe), num_steps=4, guidance_scale=5.0)
    trainable = [id(p) for p in policy.trainable_parameters()]
    traj = policy.sample(PROMPTS, [1, 2, 3, 4])
    assert (policy.kl_to_base(traj) == 0).all()  # B = 0: the adapted model is the base model
    state = {k: torch.randn_like(v) * 0.05 for k, v in policy.lora_state_dict().items()}
    policy.load_lora_state_dict(state)
    traj = policy.sample(PROMPTS, [1, 2, 3, 4])
    kl = policy.kl_to_base(traj)
    same, along = policy.sample_with_kl(PROMPTS, [1, 2, 3, 4])  # the sampler's way, while sampling
    assert torch.equal(same.latents, traj.latents)
    np.testing.assert_allclose(along, kl, rtol=1e-5)
    # Independent reference: the base model as its own pipeline, no adapter switching.
    base = copy.deepcopy(tiny_pipe)
    expected = np.zeros(len(traj))
    for i, t in enumerate(traj.timesteps):
        x = traj.latents[:, i]
        mean, std = policy.step_gaussian(traj.prompt_embeds, x, t)
        eps = base.unet(
            torch.cat([x, x]),
            t.reshape(1).expand(8),
            torch.cat([policy.uncond_embeds.expand(4, -1, -1), traj.prompt_embeds]),
        ).sample
        uncond, cond = eps.chunk(2)
        base_mean, _ = ddim.ddim_step_mean_std(
            policy.scheduler, uncond + 5.0 * (cond - uncond), t, x
        )
        expected += (((mean - base_mean) ** 2) / (2 * std**2)).mean(dim=(1, 2, 3)).detach().numpy()
    np.testing.assert_allclose(kl, expected / len(traj.timesteps), rtol=1e-4)
    assert (kl > 0).all()
    # The adapter switch leaves the LoRA trainable (the optimizer holds these parameters).
    assert [id(p) for p in policy.trainable_parameters()] == trainable
    # With gradients, the training path's KL equals the evaluation's on the same step.
    lp, step_kl = policy.log_prob_and_kl(
        traj.prompt_embeds,
        traj.latents[:, 1],
        traj.timesteps[1],
        traj.latents[:, 2],
        kl_to_base=True,
    )
    assert step_kl.requires_grad and torch.isfinite(lp).all()


def test_from_config_builds_the_policy_its_config_describes(tiny_pipe):
    """Sampler and learner build their policy from the run's config: same steps, guidance, eta,
    LoRA rank, targets and init, and LoRA's A drawn from the run's seed."""
    config = dataclasses.replace(task_config("compressibility", "tiny"), seed=5)
    s, t = config.sample, config.train
    built = Policy.from_config(config, copy.deepcopy(tiny_pipe))
    by_hand = Policy(
        copy.deepcopy(tiny_pipe), s.num_steps, s.guidance_scale, s.eta, t.lora_rank,
        seed=5, lora_init=t.lora_init, lora_targets=t.lora_targets, lora_merged=t.lora_merged,
    )  # fmt: skip
    assert built.lora_merged == by_hand.lora_merged == t.lora_merged
    ours, theirs = built.lora_state_dict(), by_hand.lora_state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(built.scheduler.timesteps, by_hand.scheduler.timesteps)
    assert (built.guidance_scale, built.eta) == (s.guidance_scale, s.eta)
    other_seed = Policy.from_config(dataclasses.replace(config, seed=6), copy.deepcopy(tiny_pipe))
    assert not all(torch.equal(ours[k], other_seed.lora_state_dict()[k]) for k in ours)
