"""The committed tiny model: real SD classes, real loading path, and it follows its prompts."""

import copy

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ddpo.policy import Policy, load_pipeline
from ddpo.tiny import world


def test_loads_with_sd_classes_and_sd14_scheduler(tiny_pipe):
    assert isinstance(tiny_pipe.unet, UNet2DConditionModel)
    assert tiny_pipe.unet.config.cross_attention_dim == tiny_pipe.text_encoder.config.hidden_size
    assert isinstance(tiny_pipe.vae, AutoencoderKL)
    assert isinstance(tiny_pipe.text_encoder, CLIPTextModel)
    assert isinstance(tiny_pipe.tokenizer, CLIPTokenizer)
    s = tiny_pipe.scheduler
    assert isinstance(s, DDIMScheduler)
    assert (s.config.beta_schedule, s.config.beta_start, s.config.beta_end) == (
        "scaled_linear",
        0.00085,
        0.012,
    )
    assert (s.config.set_alpha_to_one, s.config.steps_offset, s.config.clip_sample) == (
        False,
        1,
        False,
    )
    # Every word of the world is one token, so the text encoder sees words, not letters.
    ids = tiny_pipe.tokenizer("a yellow triangle on a checkered background").input_ids
    assert len(ids) == 2 + 7


def test_save_load_round_trip(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "copy")
    again = load_pipeline(str(tmp_path / "copy"))
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(tiny_pipe, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(again, StableDiffusionPipeline)


@pytest.fixture(scope="module")
def policy(tiny_pipe):
    return Policy(copy.deepcopy(tiny_pipe), num_steps=20, guidance_scale=5.0)


def test_different_seeds_give_different_images(policy):
    images = policy.sample(
        ["a green circle on a striped background"] * 6, np.arange(6)
    ).images.astype(float)
    pairwise = [np.abs(images[i] - images[j]).mean() for i in range(6) for j in range(i + 1, 6)]
    # Mean absolute pixel difference between any two samples of one prompt (0..255 scale).
    assert min(pairwise) > 5.0, pairwise


def test_colour_in_prompt_sets_the_colour_channel(policy):
    """Red, green and blue shapes: the shape's pixels carry the named colour. Per image, the
    top decile of the named channel's excess over the other two channels (the shape covers
    12-34% of a world image, the muted backgrounds seldom reach such an excess) is far above
    what the other colours' images show. Fails on a randomly initialised model."""

    def excess(images: np.ndarray, channel: int) -> float:
        others = [c for c in range(3) if c != channel]
        over = images[..., channel] - images[..., others].mean(axis=-1)
        return float(np.percentile(over.reshape(len(over), -1), 90, axis=1).mean())

    colours = ("red", "green", "blue")
    images = {}
    for colour in colours:
        prompts = [world.prompt_for(colour, shape, None) for shape in world.SHAPES] * 3
        images[colour] = policy.sample(prompts, np.arange(len(prompts)) + 100).images
    for channel, colour in enumerate(colours):
        own = excess(images[colour].astype(float), channel)
        others = {o: excess(images[o].astype(float), channel) for o in colours if o != colour}
        assert all(own > value + 40 for value in others.values()), (colour, own, others)
