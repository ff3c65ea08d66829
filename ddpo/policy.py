"""The policy: a Stable Diffusion pipeline with LoRA on its UNet, sampled as an MDP.

`load_pipeline` loads `tiny`, a local directory or a hub id through the same
`StableDiffusionPipeline.from_pretrained` call. `Policy` samples trajectories with per-step
log-probs (DDIM, eta = 1, classifier-free guidance) and recomputes the log-prob of a stored
transition under the current LoRA weights, with the same guided noise prediction.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from transformers.utils import logging as transformers_logging

from ddpo.ddim import (
    ddim_step_mean_std,
    ddim_step_with_log_prob,
    gaussian_kl,
    gaussian_log_prob,
)
from ddpo.lora import compute_merged
from ddpo.threads import ThreadGovernor
from ddpo.trajectory import Trajectory

if TYPE_CHECKING:
    from ddpo.config import Config

log = logging.getLogger(__name__)

TINY_MODEL_DIR = Path(__file__).parent / "tiny" / "model"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what was tried and how to fix it."""


def resolve_model(model: str) -> tuple[str, bool]:
    """Map `tiny`, a directory or a hub id to (what from_pretrained gets, is it local)."""
    if model == "tiny":
        path = TINY_MODEL_DIR
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"the tiny model is missing from {path}; reinstall the package or rebuild it with "
                "`python -m ddpo.tiny.pretrain`"
            )
        return str(path), True
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{path} is not a diffusers pipeline directory (no model_index.json); point "
                "--model at a directory written by StableDiffusionPipeline.save_pretrained"
            )
        return str(path), True
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelLoadError(
            f"--model {model!r} is neither `tiny`, an existing directory, nor a hub id like "
            "CompVis/stable-diffusion-v1-4"
        )
    return model, False


def load_pipeline(
    model: str, device: str = "cpu", dtype: torch.dtype | None = None
) -> StableDiffusionPipeline:
    """Load a Stable Diffusion pipeline and give it SD 1.4's DDIM scheduler configuration.

    Never downloads for `tiny` or a path; for a hub id, HF_HUB_OFFLINE=1 is respected.
    """
    source, local = resolve_model(model)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # fp32 also on a GPU, with TF32 matmuls there (cuDNN's convolutions use TF32 already).
    # Measured on SD 1.4's UNet (BENCHMARKS.md "GPU precision"): on the first, on-policy
    # minibatch a bf16 base model puts 86% of the importance ratios outside the paper's clip
    # range of 1e-4 (|ratio - 1| up to 0.71; fp16: 33%), so it would clip before learning
    # starts; fp32 with TF32 stays within 1.3e-5.
    dtype = dtype or torch.float32
    if device.startswith("cuda") and dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=local or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"),
        )
    except Exception as err:  # from_pretrained raises many types; one clear message for all
        where = f"directory {source}" if local else f"hub id {source} (HF_HUB_OFFLINE respected)"
        raise ModelLoadError(
            f"could not load a StableDiffusionPipeline from {where}: {type(err).__name__}: {err}. "
            "Fix: pass --model tiny, a local directory written by save_pretrained, or a hub id "
            "that is in the local Hugging Face cache"
        ) from err
    # SD checkpoints ship a PNDM config; DDIM from the same config keeps its betas, steps_offset=1
    # and set_alpha_to_one=False, without which the final step has sigma 0 and a NaN log-prob.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    counts = {
        n: sum(p.numel() for p in getattr(pipe, n).parameters())
        for n in ("unet", "vae", "text_encoder")
    }
    log.info("loaded %s (%s) on %s: %s parameters", model, dtype, device, counts)
    return pipe


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoder output [B, 3, H, W] in [-1, 1] -> uint8 images [B, H, W, 3], as rewards see them."""
    images = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


class Policy:
    """A LoRA-adapted Stable Diffusion pipeline that samples and scores DDIM trajectories."""

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        num_steps: int = 50,
        guidance_scale: float = 5.0,
        eta: float = 1.0,
        lora_rank: int = 4,
        seed: int = 0,
        lora_init: str = "default",  # or "gaussian": A ~ N(0, (1/rank)^2), as diffusers' LoRA
        lora_targets: tuple[str, ...] | list[str] = tuple(LORA_TARGETS),
        lora_merged: bool = False,
    ):
        self.pipe = pipe
        self.unet = pipe.unet
        self.device = pipe.unet.device
        self.guidance_scale = guidance_scale
        self.eta = eta
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
            module.eval()
        # peft's default init makes B = 0, so the adapted model starts equal to the base model;
        # A is random, drawn here from `seed` (not the global RNG) so that runs are reproducible.
        device = pipe.unet.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            self.unet.add_adapter(
                LoraConfig(
                    r=lora_rank,
                    lora_alpha=lora_rank,
                    target_modules=list(lora_targets),
                    init_lora_weights="gaussian" if lora_init == "gaussian" else True,
                )
            )
        # LoRA trains in fp32 even when the base model is fp16/bf16.
        for p in self.trainable_parameters():
            p.data = p.data.float()
        self.lora_merged = lora_merged
        if lora_merged:
            try:
                compute_merged(self.unet)
            except TypeError as err:  # e.g. a float16 base model under float32 adapters
                raise ValueError(
                    f"train.lora_merged: {err}; pass --train.no-lora-merged for peft's own "
                    "LoRA forward"
                ) from err
        # How many CPU threads each step uses; the sampler and learner give it theirs.
        self.threads = ThreadGovernor(None)
        self.scheduler: DDIMScheduler = pipe.scheduler
        self.scheduler.set_timesteps(num_steps, device="cpu")
        self.uncond_embeds = self.encode_prompts([""])  # [1, L, D]
        # The UNet's dtype, read once: diffusers' `unet.dtype` walks every parameter, 3.5 ms on
        # the tiny model with LoRA on every layer, at every call of a denoising step; nothing
        # changes the dtype after this point.
        self.dtype = self.unet.dtype

    @classmethod
    def from_config(cls, config: Config, pipe: StableDiffusionPipeline | None = None) -> Policy:
        """The policy a run's config describes: its model (loaded on the configured device unless
        `pipe` is given), sampling settings and LoRA, with LoRA's A drawn from the run's seed."""
        s, t = config.sample, config.train
        return cls(
            pipe if pipe is not None else load_pipeline(config.model, config.system.device),
            num_steps=s.num_steps,
            guidance_scale=s.guidance_scale,
            eta=s.eta,
            lora_rank=t.lora_rank,
            seed=config.seed,
            lora_init=t.lora_init,
            lora_targets=t.lora_targets,
            lora_merged=t.lora_merged,
        )

    # ----- weights -----
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights as CPU tensors (what the learner publishes)."""
        state = get_peft_model_state_dict(self.unet)
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        result = set_peft_model_state_dict(self.unet, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"LoRA weights have keys this model lacks: {unexpected[:3]}...")

    # ----- the model -----
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer
        ids = tok(
            prompts,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.pipe.text_encoder(ids)[0]

    def guided_noise(
        self, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor
    ) -> torch.Tensor:
        """eps_uncond + w (eps_cond - eps_uncond), one UNet call on the doubled batch."""
        b = latents.shape[0]
        t = timesteps.reshape(-1).expand(b).to(self.device)
        embeds = prompt_embeds.to(self.device, self.dtype)
        if self.guidance_scale == 1.0:
            return self.unet(latents, t, embeds).sample
        uncond = self.uncond_embeds.expand(b, -1, -1).to(embeds.dtype)
        eps = self.unet(
            torch.cat([latents, latents]), torch.cat([t, t]), torch.cat([uncond, embeds])
        ).sample
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)

    def log_prob(
        self,
        prompt_embeds: torch.Tensor,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        next_latents: torch.Tensor,
    ) -> torch.Tensor:
        """log pi(next_latents | latents, t, c) [B] under the current weights, with gradients."""
        return self.log_prob_and_kl(prompt_embeds, latents, timesteps, next_latents)[0]

    def log_prob_and_kl(
        self,
        prompt_embeds: torch.Tensor,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        next_latents: torch.Tensor,
        kl_to_base: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`log_prob`, and with kl_to_base also KL(pi || pi_base) of the step [B] (with
        gradients through pi; the base model's step costs one more UNet call, without them)."""
        latents = latents.to(self.device, self.dtype)
        mean, std = self.step_gaussian(prompt_embeds, latents, timesteps)
        x = next_latents.to(self.device).float()
        log_prob = gaussian_log_prob(x, mean, std)
        if not kl_to_base:
            return log_prob, None
        with torch.no_grad(), self.base_model():
            base_mean, _ = self.step_gaussian(prompt_embeds, latents, timesteps)
        return log_prob, gaussian_kl(mean, base_mean, std)

    def step_gaussian(
        self, prompt_embeds: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and std of the guided DDIM step from `latents` at `timesteps`."""
        eps = self.guided_noise(latents, timesteps, prompt_embeds)
        return ddim_step_mean_std(
            self.scheduler, eps.float(), timesteps.cpu(), latents.float(), eta=self.eta
        )

    @contextmanager
    def base_model(self) -> Iterator[None]:
        """The UNet without its LoRA (peft's adapter switch) inside the block."""
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    @torch.no_grad()
    def kl_to_base(self, traj: Trajectory) -> np.ndarray:
        """Per sample, KL(pi || pi_base) of each denoising step of `traj`, averaged over the
        steps (and the latent's dimensions): how far the current weights have moved the policy
        from the base model, on these states. Exactly 0 while LoRA's B is 0."""
        total = torch.zeros(len(traj))
        for i, t in enumerate(traj.timesteps):
            x = traj.latents[:, i].to(self.device, self.dtype)
            with self.threads.step(("kl", len(traj))):
                mean, std = self.step_gaussian(traj.prompt_embeds, x, t)
                with self.base_model():
                    base_mean, _ = self.step_gaussian(traj.prompt_embeds, x, t)
            total += gaussian_kl(mean, base_mean, std).cpu()
        return (total / len(traj.timesteps)).numpy()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents [B, C, h, w] -> uint8 images [B, H, W, 3]."""
        vae = self.pipe.vae
        return to_uint8(vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample)

    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    def sample(
        self,
        prompts: list[str],
        seeds: np.ndarray | list[int],
        policy_version: int = 0,
        sampler_id: int = 0,
        batch_id: str = "0-0",
    ) -> Trajectory:
        """Sample one trajectory per prompt; sample i's noise comes from seeds[i] alone."""
        ids = dict(policy_version=policy_version, sampler_id=sampler_id, batch_id=batch_id)
        return self._sample(prompts, seeds, ids)[0]

    def sample_with_kl(
        self, prompts: list[str], seeds: np.ndarray | list[int], **ids: Any
    ) -> tuple[Trajectory, np.ndarray]:
        """`sample`, and each sample's KL to the base model as `kl_to_base` gives it, computed
        along the way: one more UNet call a step (the base model's) instead of two after."""
        ids = {"policy_version": 0, "sampler_id": 0, "batch_id": "0-0"} | ids  # sample's defaults
        traj, kl = self._sample(prompts, seeds, ids, kl_to_base=True)
        assert kl is not None
        return traj, kl

    @torch.no_grad()
    def _sample(
        self, prompts: list[str], seeds: np.ndarray | list[int], ids: dict, kl_to_base: bool = False
    ) -> tuple[Trajectory, np.ndarray | None]:
        seeds = np.asarray(seeds, dtype=np.int64)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        b = len(prompts)
        with self.threads.step(("encode", b)):
            embeds = self.encode_prompts(prompts)
        x = torch.stack([torch.randn(self.latent_shape(), generator=g) for g in generators])
        x = (x * self.scheduler.init_noise_sigma).to(self.device)
        latents, log_probs, kl = [x], [], torch.zeros(b)
        for t in self.scheduler.timesteps:
            with self.threads.step(("denoise", b)):
                eps = self.guided_noise(x.to(self.dtype), t, embeds)
                if kl_to_base:
                    with self.base_model():
                        base_eps = self.guided_noise(x.to(self.dtype), t, embeds)
                    mean, std = ddim_step_mean_std(self.scheduler, eps.float(), t, x, self.eta)
                    base_mean, _ = ddim_step_mean_std(
                        self.scheduler, base_eps.float(), t, x, self.eta
                    )
                    kl += gaussian_kl(mean, base_mean, std).cpu()
                x, lp = ddim_step_with_log_prob(
                    self.scheduler, eps.float(), t, x, eta=self.eta, generator=generators
                )
            latents.append(x)
            log_probs.append(lp)
        with self.threads.step(("decode", b)):
            images = self.decode(x)
        traj = Trajectory(
            prompts=list(prompts),
            prompt_embeds=embeds.cpu(),
            latents=torch.stack(latents, dim=1).cpu(),
            timesteps=self.scheduler.timesteps.clone().cpu(),
            log_probs=torch.stack(log_probs, dim=1).cpu(),
            images=images,
            seeds=seeds,
            **ids,
        )
        return traj, (kl / len(self.scheduler.timesteps)).numpy() if kl_to_base else None
