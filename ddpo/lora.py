"""LoRA beyond peft's defaults: weights on disk in the format `load_lora_weights` reads, and
layers that compute with their merged weight."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from peft.tuners.lora import LoraLayer

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


def compute_merged(model: torch.nn.Module) -> None:
    """Make every LoRA layer of `model` compute `op(x, W + scale * B A)`: one convolution or
    matrix product on the merged weight, rebuilt from A and B at each call, instead of peft's
    side branch `op(x, W) + scale * B(A(x))`. The same function, and through autograd the same
    gradients for A and B, up to float rounding; the weights, state dicts and files are
    peft's as before, and `disable_adapters()` still gives the base model.

    Why: on small models the side branch's two extra ops a layer on the activations cost more
    than its arithmetic (BENCHMARKS.md, "LoRA on the merged weight"). On large ones the merged
    weight's gradient, a full weight gradient per layer, costs more than the branch saves.

    Needs plain LoRA layers over nn.Linear or nn.Conv2d with no dropout and no variant (DoRA),
    with the base weight in the adapters' dtype; raises TypeError naming what is not, having
    changed no layer."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        base = layer.get_base_layer()
        if not isinstance(base, torch.nn.Linear | torch.nn.Conv2d):
            raise TypeError(f"merged LoRA supports Linear and Conv2d layers, not {type(base)}")
        for name in layer.lora_A:
            if layer.lora_variant.get(name) is not None:
                raise TypeError(f"merged LoRA supports plain LoRA, not {layer.lora_variant[name]}")
            if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
                raise TypeError("merged LoRA cannot apply LoRA dropout; set lora_dropout=0")
            if layer.lora_A[name].weight.dtype != base.weight.dtype:
                raise TypeError(
                    f"merged LoRA needs the base weights in the adapters' dtype "
                    f"({layer.lora_A[name].weight.dtype}), not {base.weight.dtype}"
                )
    for layer in layers:
        layer.forward = types.MethodType(_merged_forward, layer)  # type: ignore[method-assign]


def _merged_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
        return type(self).forward(self, x, *args, **kwargs)  # peft's own: base model, mixed batch
    base = self.get_base_layer()
    weight = base.weight
    for name in self.active_adapters:
        if name in self.lora_A:
            weight = weight + self.get_delta_weight(name)
    if isinstance(base, torch.nn.Conv2d):
        return base._conv_forward(x, weight, base.bias)
    return F.linear(x, weight, base.bias)
