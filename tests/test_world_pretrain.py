"""The tiny world's data recipe and the pretraining script."""

import json

import numpy as np
import pytest
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


def test_background_drop_leaves_the_background_out_of_some_captions():
    plain, prompts = world.sample_batch(np.random.default_rng(3), 64)
    same, same_prompts = world.sample_batch(np.random.default_rng(3), 64, background_drop=0.0)
    assert np.array_equal(plain, same) and prompts == same_prompts  # the default stream is kept
    _, none = world.sample_batch(np.random.default_rng(3), 32, background_drop=1.0)
    assert all(p.count(" ") == 2 and p in world.short_prompts() for p in none)
    _, mixed = world.sample_batch(np.random.default_rng(3), 64, background_drop=0.5)
    short = sum(p in world.short_prompts() for p in mixed)
    assert 16 <= short <= 48 and all(
        p in world.all_prompts() + world.short_prompts() for p in mixed
    )


@pytest.mark.parametrize("latent_size", [8, 16])
def test_pipeline_shapes_for_each_latent_size(latent_size):
    torch.manual_seed(0)
    pipe = build_pipeline(latent_size)
    assert pipe.unet.config.sample_size == latent_size
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == world.IMAGE_SIZE
    images, prompts = world.sample_batch(np.random.default_rng(0), 2)
    with torch.no_grad():
        latents = pipe.vae.encode(pretrain.to_tensor(images)).latent_dist.mode()
        assert latents.shape == (2, 4, latent_size, latent_size)
        ids = pipe.tokenizer(prompts, padding="max_length", return_tensors="pt").input_ids
        eps = pipe.unet(latents, torch.tensor([10, 500]), pipe.text_encoder(ids)[0]).sample
        assert eps.shape == latents.shape
        assert pipe.vae.decode(latents).sample.shape == (2, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    with pytest.raises(ValueError, match="latent_size 12"):
        build_pipeline(12)


def test_the_recipe_builds_the_shipped_architecture():
    """`python -m ddpo.tiny.pretrain` must rebuild what ddpo/tiny/model holds: a change to
    build.py (the attention heads, say) without pretraining again would leave them apart."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ddpo.policy import resolve_model
    from ddpo.tiny.build import build_unet, build_vae

    shipped = resolve_model("tiny")[0]

    def architecture(config) -> dict:  # as saved: tuples become lists
        return {k: v for k, v in json.loads(json.dumps(dict(config))).items() if k[0] != "_"}

    for cls, build, folder in (
        (UNet2DConditionModel, build_unet, "unet"),
        (AutoencoderKL, build_vae, "vae"),
    ):
        saved = cls.from_config(cls.load_config(f"{shipped}/{folder}")).config
        recipe = architecture(build(16).config)
        if folder == "vae":  # fixed after training from the latents' spread
            recipe.pop("scaling_factor")
        assert recipe == {k: v for k, v in architecture(saved).items() if k in recipe}, folder
