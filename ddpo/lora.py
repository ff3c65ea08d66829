"""LoRA weights on disk, in the format `StableDiffusionPipeline.load_lora_weights` reads."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers

LORA_FILE = "pytorch_lora_weights.safetensors"


def save_lora(peft_state: dict[str, torch.Tensor], directory: Path) -> Path:
    """Write a peft LoRA state dict of the UNet as a diffusers LoRA (safetensors)."""
    StableDiffusionPipeline.save_lora_weights(
        save_directory=directory,
        unet_lora_layers=convert_state_dict_to_diffusers(peft_state),
        safe_serialization=True,
    )
    return Path(directory) / LORA_FILE
