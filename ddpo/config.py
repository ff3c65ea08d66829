"""Run configuration: frozen dataclasses, one docstring per field, and task presets.

A task preset is a function returning a full `Config` with the paper's hyperparameters
(Black et al. 2023, appendix; ddpo-pytorch's config/dgx.py). With `--model tiny` the same task is
scaled down (fewer steps and samples, the tiny world's prompts) so that it runs on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Algorithm = Literal["ddpo_is", "ddpo_sf", "rwr", "sparse_rwr"]

MAX_PROMPT_CHARS = 1000
"""Longer prompts are refused: the text encoder reads only the first 77 tokens (a few hundred
characters), and every prompt is written into config.json and every checkpoint."""


@dataclass(frozen=True)
class SampleConfig:
    num_steps: int = 50
    """Denoising steps T per trajectory (DDIM)."""
    eta: float = 1.0
    """DDIM eta; 1.0 makes every step a Gaussian with the DDPM posterior variance."""
    guidance_scale: float = 5.0
    """Classifier-free guidance weight w, used alike in sampling and training."""
    batch_size: int = 8
    """Trajectories per sampler call."""
    num_batches_per_epoch: int = 4
    """Sampler calls per epoch, spread over all samplers."""

    def __post_init__(self) -> None:
        if self.eta <= 0:
            raise ValueError(f"sample.eta={self.eta}: DDPO needs a stochastic sampler, use eta > 0")
        for name in ("num_steps", "batch_size", "num_batches_per_epoch"):
            if getattr(self, name) < 1:
                raise ValueError(f"sample.{name}={getattr(self, name)} must be at least 1")


@dataclass(frozen=True)
class TrainConfig:
    algorithm: Algorithm = "ddpo_is"
    """ddpo_is (clipped importance sampling), ddpo_sf (score function), rwr or sparse_rwr."""
    learning_rate: float = 3e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """constant (the paper's), or cosine: from learning_rate at the first update down to 0 at the
    run's last (`epochs`), by policy version, so a resumed run keeps its schedule."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    batch_size: int = 4
    """Trajectories per training minibatch."""
    gradient_accumulation_steps: int = 1
    """Minibatches per optimizer step."""
    max_grad_norm: float = 1.0
    num_inner_epochs: int = 1
    """Passes over each epoch's samples."""
    clip_range: float = 1e-4
    """PPO clip range on the importance ratio (tuned to log-probs averaged over latent dims)."""
    kl_coef: float = 0.0
    """Weight of the per-step KL to the base model (LoRA off) added to the DDPO loss, as in
    Flow-GRPO; 0 is the paper's setting. Costs one more UNet call per trained step."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max]."""
    dual_clip: float = 3.0
    """For A < 0 the IS loss is capped at dual_clip * |A| (dual-clip PPO); 0 turns it off. On
    policy ratios stay near 1 and it never acts; it keeps stale async batches whose ratio
    exploded from taking over an update."""
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's (shuffled) steps trained on."""
    lora_rank: int = 4
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """UNet modules that get LoRA adapters (peft target_modules, matched by name suffix):
    the attention projections as in the paper; conv1/conv2 add the ResNet blocks' convolutions."""
    lora_init: Literal["default", "gaussian"] = "default"
    """LoRA A's init (B starts at 0 either way): peft's default (Kaiming uniform), or gaussian,
    N(0, (1/rank)^2) as in diffusers' LoRA layers that the reference implementation uses."""
    rwr_beta: float = 1.0
    """RWR temperature: weights exp(beta * reward), normalised over the batch."""
    sparse_rwr_quantile: float = 0.9
    """Sparse RWR keeps the samples whose reward is at least this batch quantile."""

    def __post_init__(self) -> None:
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"train.timestep_fraction={self.timestep_fraction} must be in (0, 1]")
        if self.learning_rate < 0:
            raise ValueError(f"train.learning_rate={self.learning_rate} must be >= 0")
        if self.kl_coef < 0:
            raise ValueError(f"train.kl_coef={self.kl_coef} must be >= 0 (0 turns the penalty off)")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"train.lr_schedule={self.lr_schedule!r}: choose constant or cosine")
        if self.lora_init not in ("default", "gaussian"):
            raise ValueError(f"train.lora_init={self.lora_init!r}: choose default or gaussian")
        if not self.lora_targets:
            raise ValueError("train.lora_targets is empty; name the UNet modules to adapt")
        for name in ("batch_size", "gradient_accumulation_steps", "num_inner_epochs", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be at least 1")


@dataclass(frozen=True)
class StatTrackerConfig:
    per_prompt: bool = True
    """Normalise rewards per prompt (else over the whole batch)."""
    buffer_size: int = 16
    """Rewards kept per prompt."""
    min_count: int = 16
    """Below this many rewards for a prompt, the batch's mean and std are used."""


@dataclass(frozen=True)
class Config:
    task: str = "compressibility"
    """Task preset (see `ddpo.config.TASKS`)."""
    model: str = "tiny"
    """`tiny`, a local diffusers pipeline directory, or a hub id (CompVis/stable-diffusion-v1-4)."""
    reward: str = "jpeg_compressibility"
    """Reward name (see `rewards.REWARDS`) or a weighted sum like aesthetic+0.5*alignment."""
    reward_workers: tuple[str, ...] = ()
    """Reward actors per reward at start, NAME=N (default 1 each)."""
    reward_workers_range: tuple[str, ...] = ()
    """Autoscaling bounds per reward pool, NAME=MIN:MAX (default: fixed at the start size)."""
    reward_urls: tuple[str, ...] = ()
    """NAME=URL: score reward NAME with the reward service at URL (`python -m rewards.serve`)
    instead of a model in its reward actors; the token comes from $DDPO_REWARD_TOKEN where the
    actors run."""
    reward_options: tuple[str, ...] = ()
    """KEY=VALUE options for the reward models (e.g. mlp=./sac+logos+ava1-l14-linearMSE.pth)."""
    prompts: tuple[str, ...] = ()
    """The prompt set; each sample's prompt is drawn uniformly from it."""
    heldout_prompts: tuple[str, ...] = ()
    """Prompts never trained on: every evaluation also scores the first `grid_prompts` of them
    with the grid's seeds, to see whether what is learned carries over (the paper, sec. 6.3)."""
    epochs: int = 100
    seed: int = 0
    num_samplers: int = 1
    """Sampler actors; sample.num_batches_per_epoch is split over them."""
    num_learners: int = 1
    """Data-parallel learner actors (one GPU each on cuda): each trains on train.batch_size /
    num_learners samples of every minibatch, gradients all-reduced, same update as one learner."""
    learner_placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement strategy of a learner group (num_learners > 1): PACK fills a multi-GPU
    learner node first; STRICT_SPREAD puts every rank on a node of its own."""
    mode: Literal["sync", "async"] = "sync"
    """sync: sample, score, train, publish in turn (the reference). async: samplers never wait
    for the learner; the learner trains on batches at most max_staleness versions old."""
    max_staleness: int = 1
    """async: a batch sampled with version v may train version v + k for k <= max_staleness;
    older batches are dropped and counted."""
    max_inflight: int = 2
    """async: sampler calls in flight per sampler (backpressure)."""
    run_dir: Path | None = None
    """Output directory; default runs/<task>-<time>."""
    address: str | None = None
    """Ray address to join; default starts a local Ray instance."""
    device: str = "cpu"
    """cpu or cuda."""
    metrics_port: int | None = None
    """Serve Prometheus metrics of the driver on this port (0 picks a free one); off if None."""
    metrics_host: str = "127.0.0.1"
    """Interface of the metrics endpoint; 0.0.0.0 to let a Prometheus on another host scrape it."""
    grid_every: int = 0
    """Also save an image grid every N epochs (0: only at the start and the end)."""
    eval_every: int = 0
    """Also score the fixed evaluation samples every N epochs (0: only at the start and the
    end); every image grid is scored too."""
    guard: str | None = None
    """REWARD[:MAX_DROP]: a reward not trained on that scores every evaluation; when it falls,
    paired and significantly, more than MAX_DROP below its start, the run stops (or warns, see
    guard_action). E.g. aesthetic:0.5 while training compressibility."""
    guard_action: Literal["stop", "warn"] = "stop"
    """What a fired guard does: stop the run (it finishes as at its last epoch) or only warn."""
    tensorboard: bool = False
    """Log scalars and grids to RUN_DIR/tensorboard (needs `pip install tensorboard`)."""
    save_every: int = 5
    """Checkpoint every N epochs (sync) or updates (async), and at the end; 0 turns it off."""
    keep_checkpoints: int = 3
    """Checkpoints kept in RUN_DIR/checkpoints (the newest ones)."""
    auto_resume: bool = False
    """If the learner is lost, start a new one from the last checkpoint instead of stopping."""
    max_bad_batches: int = 10
    """Stop the run when this many batches in a row had a non-finite (or failed) reward."""
    restart_wait_s: float = 600.0
    """How long to wait for a lost sampler to restart (on a node with room) before stopping."""
    pending_report_s: float = 30.0
    """While actors of the run wait for resources, say every this many seconds which ones, what
    they ask for and what the cluster has free."""
    pending_timeout_s: float = 300.0
    """Stop when actors have not started after this many seconds on a cluster that no autoscaler
    can grow (0: wait on). With an autoscaler the run waits for its nodes, saying so."""
    grid_prompts: int = 4
    """Fixed prompts (the first of the set) in the image grids and evaluations."""
    grid_seeds: int = 4
    """Fixed seeds per grid prompt; the grid's samples are also scored (eval.jsonl)."""
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stat_tracker: StatTrackerConfig = field(default_factory=StatTrackerConfig)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("the prompt set is empty; give a task preset or --prompts FILE")
        for i, prompt in enumerate(self.prompts):
            problem = prompt_problem(prompt)
            if problem:
                raise ValueError(f"prompt {i + 1} of the prompt set {problem}")
        for i, prompt in enumerate(self.heldout_prompts):
            problem = prompt_problem(prompt)
            if problem:
                raise ValueError(f"held-out prompt {i + 1} {problem}")
        trained = sorted(set(self.heldout_prompts) & set(self.prompts))
        if trained:
            raise ValueError(
                f"held-out prompts are also training prompts: {trained[:3]}; a held-out prompt "
                "must never be trained on, so remove it from one of the two sets"
            )
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs}: a run trains at least 1 epoch")
        if not 0 <= self.seed < 2**63:
            raise ValueError(
                f"seed={self.seed} must be in [0, 2**63): it seeds numpy and torch generators"
            )
        if self.grid_every < 0 or self.eval_every < 0:
            raise ValueError(
                f"grid_every={self.grid_every} and eval_every={self.eval_every} must be >= 0 "
                "(0: at the start and the end only)"
            )
        if self.max_staleness < 0 or self.max_inflight < 1:
            raise ValueError(
                f"max_staleness={self.max_staleness} must be >= 0 and "
                f"max_inflight={self.max_inflight} >= 1"
            )
        if self.save_every < 0 or self.keep_checkpoints < 1 or self.max_bad_batches < 1:
            raise ValueError(
                f"save_every={self.save_every} must be >= 0, keep_checkpoints="
                f"{self.keep_checkpoints} and max_bad_batches={self.max_bad_batches} >= 1"
            )
        if self.auto_resume and not self.save_every:
            raise ValueError("auto_resume needs checkpoints: set save_every >= 1")
        if self.pending_report_s <= 0 or self.pending_timeout_s < 0:
            raise ValueError(
                f"pending_report_s={self.pending_report_s} must be > 0 and pending_timeout_s="
                f"{self.pending_timeout_s} >= 0 (0: wait on)"
            )
        if self.num_samplers < 1:
            raise ValueError(f"num_samplers={self.num_samplers} must be at least 1")
        if self.num_samplers > self.sample.num_batches_per_epoch and self.mode == "sync":
            raise ValueError(
                f"num_samplers={self.num_samplers} exceeds sample.num_batches_per_epoch="
                f"{self.sample.num_batches_per_epoch}: in sync mode a sampler makes whole calls "
                "of sample.batch_size, so some would idle; use fewer samplers or more, smaller calls"
            )
        if self.num_learners < 1:
            raise ValueError(f"num_learners={self.num_learners} must be at least 1")
        if self.train.batch_size % self.num_learners:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} does not divide over num_learners="
                f"{self.num_learners}: each learner takes an equal share of every minibatch; "
                "use a number of learners that divides it"
            )
        if self.learner_placement not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(
                f"learner_placement={self.learner_placement!r}: choose PACK, SPREAD, STRICT_PACK "
                "or STRICT_SPREAD"
            )
        total = self.sample.batch_size * self.sample.num_batches_per_epoch
        per_step = self.train.batch_size * self.train.gradient_accumulation_steps
        if total % per_step:
            raise ValueError(
                f"{total} samples per epoch (sample.batch_size x num_batches_per_epoch) do not divide "
                f"into optimizer steps of {per_step} (train.batch_size x "
                "gradient_accumulation_steps); change one of them"
            )

    @property
    def samples_per_epoch(self) -> int:
        return self.sample.batch_size * self.sample.num_batches_per_epoch

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        """The inverse of `dataclasses.asdict` after a JSON round trip (RUN_DIR/config.json)."""
        nested = {"sample": SampleConfig, "train": TrainConfig, "stat_tracker": StatTrackerConfig}
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"config has fields this version does not know: {unknown}")
        values = {}
        for name, value in data.items():
            if name in nested:
                value = nested[name](
                    **{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
                )
            elif isinstance(value, list):
                value = tuple(value)
            elif name == "run_dir" and value is not None:
                value = Path(value)
            values[name] = value
        return cls(**values)


# ----- prompt sets -----
PROMPT_DIR = Path(__file__).parent / "prompts"


def read_prompt_file(path: Path | str) -> tuple[str, ...]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"prompt file {path} does not exist; pass a text file with one prompt a line"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {path} is not UTF-8 text ({err}); save it as UTF-8") from err
    prompts = []
    for number, line in enumerate(lines, 1):
        prompt = line.strip()
        if not prompt or prompt.startswith("#"):
            continue
        problem = prompt_problem(prompt)
        if problem:
            raise ValueError(f"prompt file {path}, line {number}: the prompt {problem}")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts; write one prompt a line")
    return tuple(prompts)


def prompt_problem(prompt: str) -> str | None:
    """What is wrong with one prompt (said after "the prompt ..."), or None."""
    if not isinstance(prompt, str) or not prompt.strip():
        return "is empty; every prompt needs some text"
    if len(prompt) > MAX_PROMPT_CHARS:
        return (
            f"is {len(prompt)} characters long; shorten it to at most {MAX_PROMPT_CHARS} (the "
            "text encoder reads only its first 77 tokens)"
        )
    bad = next((c for c in prompt if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        return f"holds the control character {bad!r}; remove it (a prompt is one line of text)"
    return None


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


def tiny_world() -> tuple[str, ...]:
    """All 72 prompts of the tiny model's world."""
    from ddpo.tiny import world

    return tuple(world.all_prompts())


def tiny_prompts() -> tuple[str, ...]:
    """Six prompts of the tiny world, one per colour, shapes and backgrounds cycling."""
    from ddpo.tiny import world

    return tuple(
        world.prompt_for(colour, world.SHAPES[i % 3], world.BACKGROUNDS[i % 4])
        for i, colour in enumerate(world.COLOURS)
    )


def tiny_heldout_prompts() -> tuple[str, ...]:
    """Six prompts of the tiny world never trained on: each colour with the shape and the
    background that the next colour has in `tiny_prompts`, so every (colour, shape, background)
    combination, and every colour-shape pair, is unseen in training."""
    from ddpo.tiny import world

    return tuple(
        world.prompt_for(colour, world.SHAPES[(i + 1) % 3], world.BACKGROUNDS[(i + 1) % 4])
        for i, colour in enumerate(world.COLOURS)
    )


# ----- task presets -----
def compressibility(tiny: bool, reward: str = "jpeg_compressibility") -> Config:
    task = "compressibility" if reward == "jpeg_compressibility" else "incompressibility"
    if tiny:
        # Chosen by a sweep on 2 CPU cores (BENCHMARKS.md, "Learning"). The policy gradient of
        # a few samples is mostly noise, so the preset buys samples: 10 DDIM steps and calls
        # of 32 samples (2.5x the time of a call of 8, the tiny UNet's ops being short) give
        # 64 samples an epoch in about 4 s. Weight drift lowers compressibility, so the trust region is
        # tight: clip 1e-3 on the 256-dimensional latent (the paper's 1e-4 is on 16,384).
        # Most of the gain comes in the first 30 epochs; past them the runs wander (one of five
        # seeds gave back most of its gain by epoch 80), so the demo stops there.
        return Config(
            task=task,
            model="tiny",
            reward=reward,
            prompts=tiny_prompts(),
            heldout_prompts=tiny_heldout_prompts(),
            epochs=30,
            sample=SampleConfig(num_steps=10, batch_size=32, num_batches_per_epoch=2),
            train=TrainConfig(learning_rate=3e-2, clip_range=1e-3, batch_size=32),
            stat_tracker=StatTrackerConfig(buffer_size=16, min_count=4),
            grid_prompts=6,
            grid_seeds=8,
            eval_every=10,
        )
    # Global sizes of the reference's 8-GPU run (ddpo-pytorch config/dgx.py, compressibility):
    # per GPU 4 sampler calls of 8 and optimizer steps of 4 x 2 accumulated, so per epoch
    # 8 x 4 x 8 GPUs = 256 samples in calls of 8, and optimizer steps of 4 x 2 x 8 = 64 samples
    # (here micro-batches of 4, 16 accumulated); 100 epochs. --num-samplers and the learner
    # count only decide where this runs.
    return Config(
        task=task,
        model="CompVis/stable-diffusion-v1-4",
        reward=reward,
        prompts=imagenet_animals(),
        heldout_prompts=everyday_objects(),
        epochs=100,
        sample=SampleConfig(batch_size=8, num_batches_per_epoch=32),
        train=TrainConfig(batch_size=4, gradient_accumulation_steps=16),
    )


def incompressibility(tiny: bool) -> Config:
    return compressibility(tiny, reward="jpeg_incompressibility")


def aesthetic(tiny: bool) -> Config:
    if tiny:
        return dataclasses.replace(compressibility(tiny=True), task="aesthetic", reward="aesthetic")
    # Reference (config/dgx.py, aesthetic): the 45 simple animals; per GPU 4 calls of 8 and
    # steps of 4 x 4 accumulated, so 256 samples an epoch and steps of 128 on 8 GPUs; a
    # 32-long stat buffer; 200 epochs.
    return Config(
        task="aesthetic",
        model="CompVis/stable-diffusion-v1-4",
        reward="aesthetic",
        prompts=simple_animals(),
        heldout_prompts=interleave(heldout_animals(), everyday_objects()),
        epochs=200,
        sample=SampleConfig(batch_size=8, num_batches_per_epoch=32),
        train=TrainConfig(batch_size=4, gradient_accumulation_steps=32),
        stat_tracker=StatTrackerConfig(buffer_size=32, min_count=16),
    )


def alignment(tiny: bool) -> Config:
    if tiny:
        return dataclasses.replace(compressibility(tiny=True), task="alignment", reward="alignment")
    # Reference (config/dgx.py, prompt-image alignment): "a(n) <animal> <activity>"; per GPU
    # 6 calls of 8 and steps of 4 x 6 accumulated, so 384 samples an epoch and steps of 192 on
    # 8 GPUs; 200 epochs.
    return Config(
        task="alignment",
        model="CompVis/stable-diffusion-v1-4",
        reward="alignment",
        prompts=animal_activities(),
        heldout_prompts=heldout_animal_activities(),
        epochs=200,
        sample=SampleConfig(batch_size=8, num_batches_per_epoch=48),
        train=TrainConfig(batch_size=4, gradient_accumulation_steps=48),
        stat_tracker=StatTrackerConfig(buffer_size=32, min_count=16),
    )


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
    tiny = model == "tiny"
    config = TASKS[task](tiny)
    return config if tiny else dataclasses.replace(config, model=model)
