"""Train the tiny LLaVA to caption the tiny world, so that the alignment reward measures something.

A LLaVA with random weights answers noise, and BERTScore of noise against the prompt is a reward
no policy can learn. This recipe teaches the tiny LLaVA of `build_tiny_llava` (the same classes
as llava-1.5: CLIP vision tower, projector, Llama) to answer the alignment question with the
scene's colour and shape, "a red circle". It trains on what the reward will see:
world images passed through the tiny diffusion model's VAE (encode, sample, decode), so they are
blurred as the policy's samples are, then through the reward's JPEG round trip and the LLaVA
processor. Only the answer's tokens (and the end of sequence) carry loss.

The answer leaves out the background, as the tiny presets' prompts do ("a red circle" spans every
background kind). The first tiny model's VAE drew every background as the same blur, and a
captioner trained to name it was right 30% of the time, against 25% by chance.

Everything is seeded; on 2 CPU cores the defaults take about 9 minutes.

    python -m rewards.captioner --out rewards/tiny_llava
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import tyro
from tqdm import tqdm

from ddpo.policy import to_uint8
from ddpo.tiny import world
from ddpo.tiny.pretrain import to_tensor
from rewards.alignment import (
    REFERENCE,
    TINY_LLAVA,
    BertScore,
    LlavaAnswerer,
    build_tiny_llava,
    jpeg_roundtrip,
)

TINY_DIFFUSION = Path(__file__).parent.parent / "ddpo" / "tiny" / "model"


@dataclass(frozen=True)
class CaptionerConfig:
    out: Path = TINY_LLAVA
    """Where the trained LLaVA and its processor are saved (save_pretrained layout)."""
    diffusion_model: Path = TINY_DIFFUSION
    """The diffusion pipeline whose VAE blurs the training images as samples are blurred."""
    seed: int = 0
    steps: int = 2500
    batch_size: int = 32
    lr: float = 2e-3
    width: int = 64
    """Hidden size of the vision tower and of the Llama."""
    patch_size: int = 4
    """The vision tower's patch: 4 gives 64 image tokens, fine enough to tell shapes apart."""
    eval_images: int = 192
    """Fresh images captioned greedily at the end, for the report."""
    threads: int = 2


class BlurredWorld:
    """World scenes as the policy's samples look: through the VAE and the reward's JPEG."""

    def __init__(self, diffusion_model: Path, rng: np.random.Generator):
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(diffusion_model / "vae").eval()
        self.rng = rng

    @torch.no_grad()
    def batch(self, n: int) -> tuple[list, list[str]]:
        images, prompts = world.sample_batch(self.rng, n)
        latents = self.vae.encode(to_tensor(images)).latent_dist.sample()
        return jpeg_roundtrip(to_uint8(self.vae.decode(latents).sample)), prompts


def answer_for(prompt: str) -> str:
    """What the captioner is taught to say of a scene: "a red circle on a plain background" ->
    "a red circle"."""
    return " ".join(prompt.split()[:3])


def training_batch(answerer: LlavaAnswerer, images: list, answers: list[str]) -> dict:
    """Processor inputs for `prompt + answer + eos`, with labels on the answer and eos only."""
    tokenizer = answerer.processor.tokenizer
    texts = [f"{answerer.prompt} {a}{tokenizer.eos_token}" for a in answers]
    inputs = answerer.processor(images=images, text=texts, return_tensors="pt", padding=True)
    prompt_len = len(answerer.processor(images=images[:1], text=[answerer.prompt]).input_ids[0])
    labels = inputs["input_ids"].clone()
    mask = inputs["attention_mask"].bool()
    first = (~mask).sum(dim=1)  # left padding: each row's text starts after its pads
    positions = torch.arange(labels.shape[1])[None, :]
    labels[(positions < (first + prompt_len)[:, None]) | ~mask] = -100
    inputs["labels"] = labels
    return inputs


def evaluate(answerer: LlavaAnswerer, data: BlurredWorld, n: int) -> dict:
    images, prompts = data.batch(n)
    answers = answerer(images)
    bertscore = BertScore("tiny")
    references = [REFERENCE.format(prompt=p) for p in prompts]
    _, recall, _ = bertscore(answers, references)
    shuffled = [references[i] for i in np.random.default_rng(0).permutation(n)]
    _, recall_shuffled, _ = bertscore(answers, shuffled)
    said = [a.split() for a in answers]
    accuracy = {
        name: float(
            np.mean(
                [s[k : k + 1] == p.split()[k : k + 1] for s, p in zip(said, prompts, strict=True)]
            )
        )
        for name, k in (("colour", 1), ("shape", 2))
    }
    return {
        "exact": float(
            np.mean([a == answer_for(p) for a, p in zip(answers, prompts, strict=True)])
        ),
        "accuracy": accuracy,
        "recall_own_prompt": float(recall.mean()),
        "recall_shuffled_prompt": float(recall_shuffled.mean()),
        "examples": [[p, a] for p, a in zip(prompts[:6], answers[:6], strict=True)],
    }


def main(cfg: CaptionerConfig) -> None:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = BlurredWorld(cfg.diffusion_model, np.random.default_rng(cfg.seed))
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="ddpo-captioner-") as scratch:
        answerer = LlavaAnswerer(
            str(build_tiny_llava(scratch, cfg.seed, cfg.width, cfg.patch_size)),
            device="cpu",
            batch_size=64,
            max_new_tokens=16,
        )
    model = answerer.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05
    )
    losses: list[float] = []
    for _ in (bar := tqdm(range(cfg.steps), desc="captioner")):
        images, prompts = data.batch(cfg.batch_size)
        answers = [answer_for(p) for p in prompts]
        loss = model(**training_batch(answerer, images, answers)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    model.eval()
    train_seconds = time.time() - start
    model.save_pretrained(cfg.out)
    answerer.processor.save_pretrained(cfg.out)
    report = {
        "config": {k: str(v) for k, v in asdict(cfg).items()},
        "train_seconds": round(train_seconds, 1),
        "final_loss": float(np.mean(losses[-100:])),
        "parameters": sum(p.numel() for p in model.parameters()),
        "eval": evaluate(answerer, data, cfg.eval_images),
    }
    (cfg.out / "captioner_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(tyro.cli(CaptionerConfig))
