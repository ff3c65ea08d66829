"""Build the tiny Stable-Diffusion-architecture pipeline from config (random weights).

The classes are exactly those of Stable Diffusion v1.4 (UNet2DConditionModel with
cross-attention, AutoencoderKL, CLIPTextModel + CLIPTokenizer, DDIMScheduler configured as SD 1.4's),
only narrower and shallower: 32x32 images, 16x16x4 latents (8x8x4 with `latent_size=8`, the
first tiny model, whose VAE blurred every texture alike), a 64-dimensional text encoder over the
tiny world's vocabulary. `ddpo.tiny.pretrain` trains it; the trained weights ship with the package.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ddpo.tiny import world

MAX_TOKENS = 16  # "<bos> a red circle on a striped background <eos>" is 9 tokens
TEXT_DIM = 64


def sd14_scheduler() -> DDIMScheduler:
    """DDIM as configured in SD 1.4's scheduler_config.json.

    With diffusers' defaults (set_alpha_to_one=True, steps_offset=0) the last step has sigma 0
    and its Gaussian log-prob is NaN, so the SD values matter here.
    """
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary holds every byte-level character (alone and as a
    word end) plus each word of the tiny world as a single token."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in world.vocabulary():
        # Merge each world word from the right so that no merge of one word can break another:
        # the final symbol of a word always carries "</w>", which only merges within that word.
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            left, right = parts[-2], parts[-1]
            merge = (left, right)
            if merge not in merges:
                merges.append(merge)
            parts = parts[:-2] + [left + right]
            vocab.setdefault(left + right, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    # transformers annotates merges as strings; the BPE tokenizer takes (left, right) pairs too.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)  # type: ignore[arg-type]


LATENT_SIZES = (8, 16)
ATTENTION_HEADS = 1


def _check_latent_size(latent_size: int) -> None:
    if latent_size not in LATENT_SIZES:
        raise ValueError(f"latent_size {latent_size} is not one of {LATENT_SIZES}")


def build_vae(latent_size: int = 16) -> AutoencoderKL:
    _check_latent_size(latent_size)
    # One block per resolution: 32x32 -> 8x8 takes two downsamplings, 32x32 -> 16x16 one.
    channels = (16, 32, 64) if latent_size == 8 else (32, 64)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=world.IMAGE_SIZE,
    )


def build_unet(latent_size: int = 16) -> UNet2DConditionModel:
    _check_latent_size(latent_size)
    if latent_size == 8:
        levels: dict = dict(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            norm_num_groups=32,
        )
    else:
        # A third, narrow level at 16x16 without attention keeps the cost of the 8x8 model:
        # cross-attention over 256 positions would make every step 2-5x slower.
        levels = dict(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 64),
            norm_num_groups=16,
        )
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        # diffusers reads this as the number of heads (its naming slip, kept for SD's configs).
        # One head of the full width: 8 heads of 4 channels made attention a third of a training
        # call, its score tensors 8x larger for the same width (BENCHMARKS, "One attention head").
        attention_head_dim=ATTENTION_HEADS,
        **levels,
    )


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config)


def build_pipeline(latent_size: int = 16) -> StableDiffusionPipeline:
    """A randomly initialised tiny pipeline, ready for `ddpo.tiny.pretrain`."""
    tokenizer = build_tokenizer()
    return StableDiffusionPipeline(
        vae=build_vae(latent_size),
        text_encoder=build_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        unet=build_unet(latent_size),
        scheduler=sd14_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
