"""The tiny world's data recipe and the pretraining script."""

import numpy as np
import torch

from ddpo.tiny import pretrain, world
from ddpo.tiny.build import build_pipeline


def test_generator_is_deterministic_from_seed():
    a, pa = world.sample_batch(np.random.default_rng(7), 16)
    b, pb = world.sample_batch(np.random.default_rng(7), 16)
    c, _ = world.sample_batch(np.random.default_rng(8), 16)
    assert np.array_equal(a, b) and pa == pb
    assert not np.array_equal(a, c)
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8


def test_world_has_all_prompts_and_wide_jpeg_range():
    from rewards.jpeg import jpeg_size_kb

    assert len(world.all_prompts()) == 6 * 3 * 4
    rng = np.random.default_rng(0)
    plain = np.stack([world.render(rng, "red", "circle", "plain") for _ in range(8)])
    noisy = np.stack([world.render(rng, "red", "circle", "noisy") for _ in range(8)])
    assert jpeg_size_kb(noisy).min() > 1.3 * jpeg_size_kb(plain).max()


def test_short_pretraining_lowers_losses():
    torch.manual_seed(0)
    cfg = pretrain.PretrainConfig(vae_steps=40, vae_batch_size=8, unet_steps=40, unet_batch_size=16)
    rng = np.random.default_rng(0)
    pipe = build_pipeline()
    vae_losses = pretrain.train_vae(pipe, cfg, rng)
    unet_losses = pretrain.train_unet(pipe, cfg, rng)
    assert np.mean(vae_losses[-5:]) < 0.9 * np.mean(vae_losses[:5])
    assert np.mean(unet_losses[-10:]) < 0.8 * np.mean(unet_losses[:10])
    assert pipe.vae.config.scaling_factor > 0
