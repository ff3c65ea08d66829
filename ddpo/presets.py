"""Task presets and their prompt sets.

A preset is a function returning a full `Config` with the paper's hyperparameters (Black et al.
2023, appendix; ddpo-pytorch's config/dgx.py); presets derive from one another. `tiny(config)`
scales any of them down to the tiny model (fewer steps and samples, the tiny world's prompts), so
that it runs on 2 CPU cores.

    config = task_config("aesthetic", "tiny")
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ddpo.config import (
    Config,
    RunConfig,
    SampleConfig,
    StatTrackerConfig,
    TrainConfig,
    override,
)
from ddpo.prompt_text import read_prompt_file

PROMPT_DIR = Path(__file__).parent / "prompts"


def simple_animals() -> tuple[str, ...]:
    return read_prompt_file(PROMPT_DIR / "simple_animals.txt")


def imagenet_animals() -> tuple[str, ...]:
    """The 398 animal classes of ImageNet-1k (the paper's compressibility prompts)."""
    return read_prompt_file(PROMPT_DIR / "imagenet_animals.txt")


def animal_activities() -> tuple[str, ...]:
    """ "a(n) <animal> <activity>" for the 45 simple animals and the paper's 3 activities."""
    activities = read_prompt_file(PROMPT_DIR / "activities.txt")
    return tuple(f"{article(a)} {a} {act}" for a in simple_animals() for act in activities)


def heldout_animals() -> tuple[str, ...]:
    return read_prompt_file(PROMPT_DIR / "heldout_animals.txt")


def everyday_objects() -> tuple[str, ...]:
    return read_prompt_file(PROMPT_DIR / "everyday_objects.txt")


def heldout_animal_activities() -> tuple[str, ...]:
    """Unseen animals with the training activities, then trained animals with unseen ones."""
    unseen = read_prompt_file(PROMPT_DIR / "heldout_activities.txt")
    seen = read_prompt_file(PROMPT_DIR / "activities.txt")
    new_animals = [f"{article(a)} {a} {act}" for a in heldout_animals() for act in seen]
    new_activities = [f"{article(a)} {a} {act}" for a in simple_animals() for act in unseen]
    return interleave(new_animals, new_activities)


def interleave(*sets: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """a0 b0 a1 b1 ... and then the rest of the longer: the first few prompts, which the
    evaluations score, take from every set."""
    out = []
    for i in range(max(map(len, sets))):
        out += [s[i] for s in sets if i < len(s)]
    return tuple(out)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def tiny_prompts() -> tuple[str, ...]:
    """Six prompts of the tiny world, one per colour, shapes cycling. They leave the background
    out, so each spans flat to noisy backgrounds, as a photo prompt leaves its backdrop open."""
    from ddpo.tiny import world

    return tuple(
        world.prompt_for(colour, world.SHAPES[i % 3], None)
        for i, colour in enumerate(world.COLOURS)
    )


def tiny_heldout_prompts() -> tuple[str, ...]:
    """Six prompts of the tiny world never trained on: each colour with the shape that the next
    colour has in `tiny_prompts`, so every colour-shape pair is unseen in training."""
    from ddpo.tiny import world

    return tuple(
        world.prompt_for(colour, world.SHAPES[(i + 1) % 3], None)
        for i, colour in enumerate(world.COLOURS)
    )


# ----- task presets -----
PAPER_MODEL = "CompVis/stable-diffusion-v1-4"


def compressibility() -> Config:
    # Global sizes of the reference's 8-GPU run (ddpo-pytorch config/dgx.py, compressibility):
    # per GPU 4 sampler calls of 8 and optimizer steps of 4 x 2 accumulated, so per epoch
    # 8 x 4 x 8 GPUs = 256 samples in calls of 8, and optimizer steps of 4 x 2 x 8 = 64 samples
    # (here micro-batches of 4, 16 accumulated); 100 epochs. --num-samplers and the learner
    # count only decide where this runs.
    return Config(
        task="compressibility",
        model=PAPER_MODEL,
        reward="jpeg_compressibility",
        prompts=imagenet_animals(),
        heldout_prompts=everyday_objects(),
        run=RunConfig(epochs=100),
        sample=SampleConfig(batch_size=8, num_batches_per_epoch=32),
        train=TrainConfig(batch_size=4, gradient_accumulation_steps=16),
    )


def incompressibility() -> Config:
    return dataclasses.replace(
        compressibility(), task="incompressibility", reward="jpeg_incompressibility"
    )


def aesthetic() -> Config:
    # Reference (config/dgx.py, aesthetic): the 45 simple animals; per GPU 4 calls of 8 and
    # steps of 4 x 4 accumulated, so 256 samples an epoch and steps of 128 on 8 GPUs; a
    # 32-long stat buffer; 200 epochs.
    return override(
        dataclasses.replace(
            compressibility(),
            task="aesthetic",
            reward="aesthetic",
            prompts=simple_animals(),
            heldout_prompts=interleave(heldout_animals(), everyday_objects()),
            stat_tracker=StatTrackerConfig(buffer_size=32, min_count=16),
        ),
        {"run.epochs": 200, "train.gradient_accumulation_steps": 32},
    )


def alignment() -> Config:
    # Reference (config/dgx.py, prompt-image alignment): "a(n) <animal> <activity>"; per GPU
    # 6 calls of 8 and steps of 4 x 6 accumulated, so 384 samples an epoch and steps of 192 on
    # 8 GPUs; 200 epochs (the aesthetic preset's).
    return override(
        dataclasses.replace(
            aesthetic(),
            task="alignment",
            reward="alignment",
            prompts=animal_activities(),
            heldout_prompts=heldout_animal_activities(),
        ),
        {"sample.num_batches_per_epoch": 48, "train.gradient_accumulation_steps": 48},
    )


def tiny(config: Config) -> Config:
    """`config`'s task on the tiny model, at a size that runs on 2 CPU cores.

    Chosen by sweeps (BENCHMARKS.md, "Learning"), the last on a GPU node in parallel
    (`bench/sweep.py`). The policy gradient of a few samples is mostly noise, so the preset buys
    samples: 10 DDIM steps and calls of 32 samples (2.5x the time of a call of 8, the tiny UNet's
    ops being short) give 64 samples an epoch in about 5 s. Weight drift lowers compressibility,
    so the trust region is tight: clip 2e-3 on the 1,024-dimensional latent (the paper's 1e-4 is
    on 16,384). LoRA's A starts with std 1/r as the reference's, not peft's Kaiming: on five
    seeds it gained 1.7x as much and every seed cleared t 3. lr 1.5e-2: at 3e-2 seeds diverge
    (one drifts the wrong way in its first epochs and never comes back), and 6e-2 collapses.
    Runs stop at 30 epochs. Five steps of a minibatch train in one UNet call of 160 latents,
    20% less time a sample than calls of 32 on 2 cores (and than 320, which also takes 2 GB).
    Adapted layers compute with their merged weight: peft's side branch of two small ops a
    layer costs the tiny UNet more than its arithmetic.

    On top of that, each task takes what its own five-seed study chose (`TINY_TASK_SETTINGS`).
    """
    train = TrainConfig(
        learning_rate=1.5e-2,
        clip_range=2e-3,
        batch_size=32,
        steps_per_call=5,
        lora_init="gaussian",
        lora_merged=True,
    )
    config = dataclasses.replace(
        config,
        model="tiny",
        prompts=tiny_prompts(),
        heldout_prompts=tiny_heldout_prompts(),
        run=dataclasses.replace(config.run, epochs=30, eval_every=10),
        sample=SampleConfig(num_steps=10, batch_size=32, num_batches_per_epoch=2),
        train=train,
        stat_tracker=StatTrackerConfig(buffer_size=16, min_count=4),
        grid_prompts=6,
        grid_seeds=8,
    )
    return override(config, TINY_TASK_SETTINGS.get(config.task, {}))


# Each epoch's samples trained twice, each time on a random half of every trajectory's steps:
# the compute of one pass over all steps with twice the optimizer steps.
TWO_PASSES: dict[str, object] = {"train.num_inner_epochs": 2, "train.timestep_fraction": 0.5}

# LoRA on every linear layer and convolution of the UNet's blocks, not only the attention
# projections: the tiny UNet has attention at its 8x8 level alone, so attention adapters never
# reach the 16x16 level that draws the background's texture.
EVERY_LAYER = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "time_emb_proj",
)

# What each task's study on five seeds against shuffled controls chose over the common tiny
# preset (BENCHMARKS.md, "Learning").
# - compressibility: two passes gained 1.4x one pass's in 30 epochs, every seed with t >= 8,
#   and the controls lost on average. With attention adapters alone it levels off near 23% of
#   the room to a flat image however long it runs. Adapters on every layer at a fifth of the
#   rate go on rising: 32% of the room at 80 epochs, every seed with t >= 11.3 and every
#   control below its start (the one-head model). 80 epochs take 4 minutes through Ray on the
#   faster 2-core machines, an estimated 9.5 to 11 on the slower.
# - incompressibility: drift raises this reward; on 64 samples an epoch, two seeds of five ended
#   at or under their shuffled controls. 128 an epoch in optimizer steps of 64, with two passes,
#   put every run over its control by t >= 4.9 at epoch 20 and the controls near zero. An epoch
#   costs 1.9x, so the run stops at 20 epochs to stay within 10 minutes on 2 cores.
# - alignment: with two passes every seed ended over its control on the eight-head model (one
#   pass: seed 0 ended under its control, t -2.8); on the one-head model one seed of five ties
#   its control, at 30 epochs as at 60 (BENCHMARKS.md, "One attention head").
# - aesthetic keeps one pass, on which every seed beats its control.
TINY_TASK_SETTINGS: dict[str, dict[str, object]] = {
    "compressibility": TWO_PASSES
    | {"train.lora_targets": EVERY_LAYER, "train.learning_rate": 3e-3, "run.epochs": 80},
    "incompressibility": TWO_PASSES
    | {"sample.num_batches_per_epoch": 4, "train.gradient_accumulation_steps": 2, "run.epochs": 20},
    "alignment": TWO_PASSES,
}


TASKS = {
    "compressibility": compressibility,
    "incompressibility": incompressibility,
    "aesthetic": aesthetic,
    "alignment": alignment,
}


def task_config(task: str, model: str = "tiny") -> Config:
    """The preset of `task`, scaled down when model is `tiny`, pointed at `model` otherwise."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    config = TASKS[task]()
    return tiny(config) if model == "tiny" else dataclasses.replace(config, model=model)
