"""LoRA weights on disk, in the format `StableDiffusionPipeline.load_lora_weights` reads."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

LORA_FILE = "pytorch_lora_weights.safetensors"


def save_lora(peft_state: dict[str, torch.Tensor], directory: Path) -> Path:
    """Write a peft LoRA state dict of the UNet as a diffusers LoRA (safetensors).

    The keys stay peft's (`lora_A`/`lora_B`), which `load_lora_weights` reads for every layer.
    diffusers' `convert_state_dict_to_diffusers` would rename only the attention projections'
    keys to its older `lora.down`/`lora.up` names, and a file that mixes the two loses those on
    loading once the adapters also sit on convolutions or feed-forward layers."""
    StableDiffusionPipeline.save_lora_weights(
        save_directory=directory, unet_lora_layers=peft_state, safe_serialization=True
    )
    return Path(directory) / LORA_FILE
