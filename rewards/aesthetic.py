"""LAION aesthetic reward: a linear MLP on the L2-normalized CLIP ViT-L/14 image embedding.

Provenance: LAION's improved-aesthetic-predictor (`sac+logos+ava1-l14-linearMSE.pth`, trained on
SAC, LAION-Logos and AVA ratings) as used by ddpo-pytorch's `aesthetic_score`. The MLP is
768-1024-128-64-16-1 with dropout between the first four layers and no nonlinearity, so in eval
mode the whole predictor is one affine map of the normalized embedding.

    fn = AestheticScorer("openai/clip-vit-large-patch14", "sac+logos+ava1-l14-linearMSE.pth")
    rewards, info = fn(images_uint8_nhwc, prompts)        # float32 [N], {}
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rewards import resolve_device
from rewards.jpeg import check_images

log = logging.getLogger(__name__)

AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
EMBED_DIM = 768  # CLIP ViT-L/14 projection dim, the MLP's input


class AestheticMLP(nn.Module):
    """The predictor as LAION wrote it; the indices match the state dict keys layers.{0,2,4,6,7}."""

    def __init__(self, input_size: int = EMBED_DIM):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        return self.layers(embed)  # [N, 768] -> [N, 1]


def load_aesthetic_mlp(path: str | Path) -> AestheticMLP:
    """Read the predictor from a `.pth` state dict (tensors only, never arbitrary pickles) or
    a `.safetensors` file, and check every key and shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"aesthetic MLP weights {str(path)!r} not found: pass mlp_path=<file>, e.g. LAION's "
            "sac+logos+ava1-l14-linearMSE.pth (improved-aesthetic-predictor) or a .safetensors copy"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # an UnpicklingError names the offending global
            raise ValueError(
                f"{path} is not a plain tensor state dict ({err.__class__.__name__}: {err}); "
                "convert it to .safetensors or re-save just its state_dict"
            ) from err
    mlp = AestheticMLP()
    expected = {k: tuple(v.shape) for k, v in mlp.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
    if got != expected:
        diff = sorted(set(expected.items()) ^ set(got.items()))
        raise ValueError(
            f"{path} is not a LAION aesthetic MLP (768-1024-128-64-16-1): keys/shapes differ at "
            f"{diff[:6]}; expected keys {sorted(expected)}"
        )
    mlp.load_state_dict(state)
    return mlp.eval()


TINY_VISION: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)
"""The tiny CLIP vision tower of the test models (tiny CLIP here, tiny LLaVA's tower)."""


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """A seeded tiny CLIPModel (32x32 images, 768-dim projection so the real MLP fits) and its
    image processor, written with save_pretrained: load it back like any CLIP checkpoint."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
        ),
        vision_config=TINY_VISION,
        projection_dim=EMBED_DIM,
    )
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    CLIPModel(config).save_pretrained(out_dir)
    CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(out_dir)
    return out_dir


class AestheticScorer:
    """`(images uint8 [N, H, W, 3], prompts) -> (aesthetic scores float32 [N], {})`.

    clip_model: a CLIP checkpoint directory or hub id (or "tiny": a seeded tiny CLIP, built now);
    mlp_path: the predictor's .pth or .safetensors (or "tiny": a seeded random MLP).
    """

    def __init__(
        self,
        clip_model: str = AESTHETIC_CLIP,
        mlp_path: str | Path | None = None,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int = 32,
    ):
        from transformers import AutoImageProcessor, CLIPModel

        if mlp_path is None:
            raise ValueError(
                "the aesthetic reward needs mlp_path=<sac+logos+ava1-l14-linearMSE.pth or "
                ".safetensors> (on the CLI: --reward-model mlp=PATH), or mlp_path=tiny for a test"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.device = resolve_device(device)
        self.dtype = getattr(torch, dtype)
        self.batch_size = batch_size
        with contextlib.ExitStack() as stack:
            if clip_model == "tiny":  # built, loaded, and its files removed
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="ddpo-tiny-clip-"))
                clip_model = str(build_tiny_clip(tmp))
            # PIL, whether or not torchvision is installed: the preprocessing the LAION predictor
            # was trained with, the same numbers on every machine, and no fallback warning.
            self.processor = AutoImageProcessor.from_pretrained(clip_model, backend="pil")
            clip = CLIPModel.from_pretrained(clip_model, dtype=self.dtype)
        self.clip = clip.to(self.device).eval()  # type: ignore[arg-type]  # transformers' .to stub
        if str(mlp_path) == "tiny":
            log.warning("aesthetic: a random tiny MLP (mlp_path=tiny); its scores mean nothing")
            torch.manual_seed(0)
            self.mlp = AestheticMLP(self.clip.config.projection_dim).eval()
        else:
            self.mlp = load_aesthetic_mlp(mlp_path)
        if self.clip.config.projection_dim != self.mlp.layers[0].in_features:
            raise ValueError(
                f"CLIP {clip_model!r} embeds to {self.clip.config.projection_dim} dims but the MLP "
                f"takes {self.mlp.layers[0].in_features}: use CLIP ViT-L/14 with the LAION MLP"
            )
        self.mlp.to(self.device)

    @torch.inference_mode()
    def embed(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> L2-normalized CLIP image embeddings float32 [N, 768]."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        out = self.clip.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        # transformers 5 returns the projected pooler output inside a model output.
        features = out if isinstance(out, torch.Tensor) else out.pooler_output
        features = features.float()
        return features / torch.linalg.vector_norm(features, dim=-1, keepdim=True)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, dict]:
        check_images(images)
        if len(images) == 0:
            return np.zeros(0, np.float32), {}
        scores = []
        for start in range(0, len(images), self.batch_size):
            embed = self.embed(images[start : start + self.batch_size])  # [b, 768]
            scores.append(self.mlp(embed).squeeze(1).cpu())  # [b]
        return torch.cat(scores).numpy().astype(np.float32), {}
