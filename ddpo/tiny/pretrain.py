"""Pretrain the tiny Stable-Diffusion-architecture model on the procedural world of `ddpo.tiny.world`.

Stage 1 trains the VAE (L1 + MSE reconstruction, a small KL term) and fixes its latent scaling
factor from the latents' standard deviation, as SD's 0.18215 was chosen. Stage 2 trains the UNet
and the text encoder together with the standard epsilon-prediction loss, dropping 10% of prompts
to "" so that classifier-free guidance works; an EMA of the weights is what gets saved.
Everything is seeded; on 2 CPU cores the defaults take about 15 minutes (the faster kind).

    python -m ddpo.tiny.pretrain --out ddpo/tiny/model
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from diffusers import DDPMScheduler
from tqdm import tqdm

from ddpo.tiny import world
from ddpo.tiny.build import build_pipeline


@dataclass(frozen=True)
class PretrainConfig:
    out: Path = Path("ddpo/tiny/model")
    """Where the trained pipeline is saved (save_pretrained layout, safetensors)."""
    seed: int = 0
    """Seeds the data generator and torch."""
    latent_size: int = 16
    """16 (16x16x4 latents, the shipped model) or 8 (the first tiny model's 8x8x4, whose VAE
    blurred every background to the same JPEG size)."""
    background_drop: float = 0.5
    """Share of the UNet's captions without their background ("a red circle"), so that one
    prompt spans plain to noisy backgrounds."""
    vae_steps: int = 1200
    """VAE optimisation steps."""
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    """Weight of the KL term; small, as in SD's VAE, so latents stay informative."""
    unet_steps: int = 4000
    """UNet + text-encoder optimisation steps."""
    unet_batch_size: int = 64
    unet_lr: float = 1e-3
    uncond_prob: float = 0.1
    """Fraction of prompts replaced by "" so that the model also learns the unconditional score."""
    ema_decay: float = 0.999
    threads: int = 2
    """torch intra-op threads."""


def train_vae(pipe, cfg: PretrainConfig, rng: np.random.Generator) -> list[float]:
    vae = pipe.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.vae_steps)
    losses = []
    for _ in (bar := tqdm(range(cfg.vae_steps), desc="vae")):
        images, _ = world.sample_batch(rng, cfg.vae_batch_size)
        x = to_tensor(images)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = rec + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(rec.item())
        bar.set_postfix(rec=f"{np.mean(losses[-50:]):.4f}")
    vae.eval().requires_grad_(False)
    # Scale latents to unit variance, as SD does with its fixed 0.18215.
    with torch.no_grad():
        images, _ = world.sample_batch(rng, 512)
        std = vae.encode(to_tensor(images)).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return losses


def train_unet(pipe, cfg: PretrainConfig, rng: np.random.Generator) -> list[float]:
    unet, text_encoder, tokenizer, vae = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [copy.deepcopy(m).requires_grad_(False) for m in (unet, text_encoder)]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.unet_lr, total_steps=cfg.unet_steps, pct_start=0.05
    )
    unet.train()
    text_encoder.train()
    losses = []
    for _ in (bar := tqdm(range(cfg.unet_steps), desc="unet")):
        images, prompts = world.sample_batch(rng, cfg.unet_batch_size, cfg.background_drop)
        prompts = ["" if rng.random() < cfg.uncond_prob else p for p in prompts]
        with torch.no_grad():
            latents = vae.encode(to_tensor(images)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(prompts),))
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for model, shadow in zip((unet, text_encoder), ema, strict=True):
                for p, s in zip(model.parameters(), shadow.parameters(), strict=True):
                    s.lerp_(p, 1.0 - cfg.ema_decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    pipe.unet, pipe.text_encoder = (m.eval() for m in ema)
    return losses


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def main(cfg: PretrainConfig) -> None:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    pipe = build_pipeline(cfg.latent_size)
    start = time.time()
    vae_losses = train_vae(pipe, cfg, rng)
    vae_seconds = time.time() - start
    unet_losses = train_unet(pipe, cfg, rng)
    seconds = time.time() - start
    pipe.save_pretrained(cfg.out, safe_serialization=True)
    report = {
        "config": {k: str(v) for k, v in asdict(cfg).items()},
        "vae_seconds": round(vae_seconds, 1),
        "total_seconds": round(seconds, 1),
        "vae_final_reconstruction_loss": float(np.mean(vae_losses[-100:])),
        "unet_final_loss": float(np.mean(unet_losses[-200:])),
        "latent_scaling_factor": pipe.vae.config.scaling_factor,
        "parameters": {
            name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("unet", "vae", "text_encoder")
        },
    }
    (cfg.out / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(tyro.cli(PretrainConfig))
