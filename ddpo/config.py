"""Run configuration: frozen dataclasses, one docstring per field (they are `--help`).

    Config                 what is trained: task, model, reward, prompts, seed, evaluation
      .run   RunConfig     where the run lives and how long: directory, epochs, cluster,
                           checkpoints, metrics (all a resume may change)
      .system SystemConfig what it runs on: device, samplers, learners, sync/async, reward pools
      .sample / .train / .stat_tracker   the algorithm's hyperparameters

Task presets are in `ddpo.presets`, the prompt checks in `ddpo.prompt_text`, the reward pools'
sizes in `ddpo.pools`, and `override` and `from_dict`, which work on any nested dataclass, in
`ddpo.fields`. `learner.run` builds its command line from these classes with tyro: every field
is a flag (`--train.clip-range 1e-3`), and the `aliases` below keep the short flags (`--epochs`,
`--run-dir`) that the README and deployments use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from ddpo.fields import ConfigError, differences, from_dict
from ddpo.fields import override as override  # the config's own API: override(config, changes)
from ddpo.pools import PoolSize, parse_pool_sizes
from ddpo.prompt_text import prompt_problem

Algorithm = Literal["ddpo_is", "ddpo_sf", "rwr", "sparse_rwr"]
Task = Literal["compressibility", "incompressibility", "aesthetic", "alignment"]


def alias(*flags: str) -> Any:
    """A tyro marker: the field's flag also answers to these names (the flags of the flat
    command line that came before the sub-configs)."""
    return tyro.conf.arg(aliases=flags)


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
            raise ConfigError(
                f"sample.eta={self.eta}: DDPO needs a stochastic sampler, use eta > 0"
            )
        for name in ("num_steps", "batch_size", "num_batches_per_epoch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sample.{name}={getattr(self, name)} must be at least 1")


@dataclass(frozen=True)
class TrainConfig:
    algorithm: Algorithm = "ddpo_is"
    """ddpo_is (clipped importance sampling), ddpo_sf (score function), rwr or sparse_rwr."""
    learning_rate: Annotated[float, alias("--learning-rate")] = 3e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """constant (the paper's), or cosine: from learning_rate at the first update down to 0 at the
    run's last (`epochs`), by policy version, so a resumed run keeps its schedule."""
    warmup_updates: int = 0
    """The first N updates ramp the learning rate linearly, 1/(N+1) of it at the first and the
    full rate from update N+1 on (then the schedule): Adam's first steps on a fresh LoRA have
    full size in a mostly random direction. 0 turns it off."""
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
    kl_coef: Annotated[float, alias("--kl-coef")] = 0.0
    """Weight of the per-step KL to the base model (LoRA off) added to the DDPO loss, as in
    Flow-GRPO; 0 is the paper's setting. Costs one more UNet call per trained step."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max]."""
    dual_clip: float = 3.0
    """For A < 0 the IS loss is capped at dual_clip * |A| (dual-clip PPO); 0 turns it off. On
    policy ratios stay near 1 and it never acts; it keeps stale async batches whose ratio
    exploded from taking over an update."""
    decoupled: bool = True
    """Decoupled PPO for stale (async) samples, within the clip range: where the learner's
    weights at the start of the update are still within the clip range of the sampler's on a
    transition, clip around them rather than the sampler's and weight by the ratio of the two
    (Hilton et al. 2021); elsewhere plain PPO (learner.losses.ddpo_is_loss). Costs one forward
    pass per stale (sample, step) pair trained after the update's first optimizer step and not
    before it; fresh samples, so every sync run, train bit for bit as without it. On the demo's
    preset through Ray it gained 93% and 98% of sync's gain at equal trained samples in two
    draws of five seeds (95% pooled), against plain PPO's 82%, with no approx_kl above 0.015
    after update 5 (BENCHMARKS.md, "Decoupled PPO through Ray, a third draw"); decoupling every
    stale term, as it did before, let runs diverge."""
    target_kl: float = 0.0
    """Early stop: an update's optimizer step whose minibatches' approx_kl (their log-probs
    against the clip's centre: the weights the update started from, or the sampler's for plain
    PPO's stale samples) exceeds target_kl is not taken, and the update ends there (its first
    step is always taken); 0 turns it off. In a run whose one step moved approx_kl by nats it
    bounded the spike to that step, but could not prevent it (BENCHMARKS.md, "Decoupled PPO
    through Ray, a third draw")."""
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's (shuffled) steps trained on."""
    steps_per_call: int = 1
    """Denoising steps of a minibatch trained in one UNet call (ddpo_is, ddpo_sf), which then
    holds batch_size x steps_per_call latents: the same gradient in fewer, larger calls (the
    tiny model's update takes 0.82x the time at 5 on 2 CPU cores, BENCHMARKS.md "Several
    denoising steps a UNet call"); activation memory grows with it, so large models keep 1."""
    lora_rank: int = 4
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """UNet modules that get LoRA adapters (peft target_modules, matched by name suffix):
    the attention projections as in the paper; conv1/conv2 add the ResNet blocks' convolutions."""
    lora_init: Literal["default", "gaussian"] = "default"
    """LoRA A's init (B starts at 0 either way): peft's default (Kaiming uniform), or gaussian,
    N(0, (1/rank)^2) as in diffusers' LoRA layers that the reference implementation uses."""
    lora_merged: bool = False
    """Adapted layers compute with their merged weight, W + scale * B A rebuilt at each call,
    in one op instead of peft's side branch of two (ddpo.lora.compute_merged): the same
    function and gradients up to float rounding. On the tiny model on 2 CPU cores, where the
    branch's small ops cost more than its arithmetic, sampling takes 0.80x and training 0.78x
    the time (BENCHMARKS.md, "LoRA on the merged weight"); large models pay a full weight
    gradient per adapted layer for it, so their presets keep it off. Needs a float32 base."""
    rwr_beta: float = 1.0
    """RWR temperature: weights exp(beta * reward), normalised over the batch."""
    sparse_rwr_quantile: float = 0.9
    """Sparse RWR keeps the samples whose reward is at least this batch quantile."""

    def __post_init__(self) -> None:
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(f"train.timestep_fraction={self.timestep_fraction} must be in (0, 1]")
        if not self.target_kl >= 0:
            raise ConfigError(f"train.target_kl={self.target_kl} must be >= 0 (0 turns it off)")
        if self.learning_rate < 0:
            raise ConfigError(f"train.learning_rate={self.learning_rate} must be >= 0")
        if self.kl_coef < 0:
            raise ConfigError(
                f"train.kl_coef={self.kl_coef} must be >= 0 (0 turns the penalty off)"
            )
        if self.warmup_updates < 0:
            raise ConfigError(f"train.warmup_updates={self.warmup_updates} must be >= 0")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"train.lr_schedule={self.lr_schedule!r}: choose constant or cosine")
        if self.lora_init not in ("default", "gaussian"):
            raise ConfigError(f"train.lora_init={self.lora_init!r}: choose default or gaussian")
        if not self.lora_targets:
            raise ConfigError("train.lora_targets is empty; name the UNet modules to adapt")
        for name in (
            "batch_size",
            "gradient_accumulation_steps",
            "num_inner_epochs",
            "steps_per_call",
            "lora_rank",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be at least 1")


@dataclass(frozen=True)
class StatTrackerConfig:
    per_prompt: bool = True
    """Normalise rewards per prompt (else over the whole batch)."""
    buffer_size: int = 16
    """Rewards kept per prompt."""
    min_count: int = 16
    """Below this many rewards for a prompt, the batch's mean and std are used."""


@dataclass(frozen=True)
class RunConfig:
    """Where the run lives, how long it goes and what it reports: all that a resumed run may
    change (`--resume DIR --epochs 200`); every other field is the run's own."""

    dir: Annotated[Path | None, alias("--run-dir")] = None
    """Output directory; default runs/<task>-<time>."""
    epochs: Annotated[int, alias("--epochs")] = 100
    """Training epochs; a resume may extend them."""
    address: Annotated[str | None, alias("--address")] = None
    """Ray cluster to join (e.g. auto); default starts a local Ray instance."""
    save_every: Annotated[int, alias("--save-every")] = 5
    """Checkpoint every N epochs (sync) or updates (async), and at the end; 0 turns it off."""
    keep_checkpoints: Annotated[int, alias("--keep-checkpoints")] = 3
    """Checkpoints kept in RUN_DIR/checkpoints (the newest ones)."""
    auto_resume: Annotated[bool, alias("--auto-resume")] = False
    """If the learner is lost, start a new one from the last checkpoint instead of stopping."""
    metrics_port: Annotated[int | None, alias("--metrics-port")] = None
    """Serve Prometheus metrics of the driver on this port (0 picks a free one); off if None."""
    metrics_host: Annotated[str, alias("--metrics-host")] = "127.0.0.1"
    """Interface of the metrics endpoint; 0.0.0.0 to let a Prometheus on another host scrape it."""
    tensorboard: Annotated[bool, alias("--tensorboard")] = False
    """Log scalars and grids to RUN_DIR/tensorboard (needs `pip install tensorboard`)."""
    grid_every: Annotated[int, alias("--grid-every")] = 0
    """Also save an image grid every N epochs (0: only at the start and the end)."""
    eval_every: Annotated[int, alias("--eval-every")] = 0
    """Also score the fixed evaluation samples every N epochs (0: only at the start and the
    end); every image grid is scored too."""
    pending_report_s: float = 30.0
    """While actors of the run wait for resources, say every this many seconds which ones, what
    they ask for and what the cluster has free."""
    pending_timeout_s: Annotated[float, alias("--pending-timeout")] = 300.0
    """Stop when actors have not started after this many seconds on a cluster that no autoscaler
    can grow (0: wait on). With an autoscaler the run waits for its nodes, saying so."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"run.epochs={self.epochs}: a run trains at least 1 epoch")
        if self.grid_every < 0 or self.eval_every < 0:
            raise ConfigError(
                f"run.grid_every={self.grid_every} and run.eval_every={self.eval_every} must be "
                ">= 0 (0: at the start and the end only)"
            )
        if self.save_every < 0 or self.keep_checkpoints < 1:
            raise ConfigError(
                f"run.save_every={self.save_every} must be >= 0 and run.keep_checkpoints="
                f"{self.keep_checkpoints} >= 1"
            )
        if self.auto_resume and not self.save_every:
            raise ConfigError("run.auto_resume needs checkpoints: set run.save_every >= 1")
        if self.pending_report_s <= 0 or self.pending_timeout_s < 0:
            raise ConfigError(
                f"run.pending_report_s={self.pending_report_s} must be > 0 and "
                f"run.pending_timeout_s={self.pending_timeout_s} >= 0 (0: wait on)"
            )


@dataclass(frozen=True)
class SystemConfig:
    """What the run runs on: the device, how many samplers and learners, sync or async, and the
    reward pools."""

    device: Annotated[str, alias("--device")] = "cpu"
    """cpu or cuda."""
    num_samplers: Annotated[int, alias("--num-samplers")] = 1
    """Sampler actors; sample.num_batches_per_epoch is split over them."""
    num_learners: Annotated[int, alias("--num-learners")] = 1
    """Data-parallel learner actors (one GPU each on cuda): each trains on train.batch_size /
    num_learners samples of every minibatch, gradients all-reduced, same update as one learner."""
    learner_placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement strategy of a learner group (num_learners > 1): PACK fills a multi-GPU
    learner node first; STRICT_SPREAD puts every rank on a node of its own."""
    mode: Annotated[Literal["sync", "async"], alias("--mode")] = "sync"
    """sync: sample, score, train, publish in turn (the reference). async: samplers never wait
    for the learner; the learner trains on batches at most max_staleness versions old."""
    max_staleness: Annotated[int, alias("--max-staleness")] = 1
    """async: a batch sampled with version v may train version v + k for k <= max_staleness;
    older batches are dropped and counted."""
    max_inflight: int = 2
    """async: the most sampler calls in flight per sampler; the driver starts only calls whose
    batches the next update will train."""
    reward_workers: Annotated[tuple[str, ...], alias("--reward-workers")] = ()
    """Reward actors per reward at start, NAME=N (default 1 each), e.g. aesthetic=4."""
    reward_workers_range: Annotated[tuple[str, ...], alias("--reward-workers-range")] = ()
    """Autoscaling bounds per reward pool, NAME=MIN:MAX (default: fixed at the start size),
    e.g. aesthetic=1:8."""
    reward_urls: Annotated[tuple[str, ...], alias("--reward-url")] = ()
    """NAME=URL: score reward NAME with the reward service at URL (`python -m rewards.serve`)
    instead of a model in its reward actors; the token comes from $DDPO_REWARD_TOKEN where the
    actors run."""
    restart_wait_s: float = 600.0
    """How long to wait for a lost sampler to restart (on a node with room) before stopping."""
    max_bad_batches: int = 10
    """Stop the run when this many batches in a row had a non-finite (or failed) reward."""

    def __post_init__(self) -> None:
        for name in ("num_samplers", "num_learners", "max_inflight", "max_bad_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"system.{name}={getattr(self, name)} must be at least 1")
        if self.max_staleness < 0:
            raise ConfigError(f"system.max_staleness={self.max_staleness} must be >= 0")
        if self.learner_placement not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ConfigError(
                f"system.learner_placement={self.learner_placement!r}: choose PACK, SPREAD, "
                "STRICT_PACK or STRICT_SPREAD"
            )
        parse_pool_sizes(self.reward_workers, self.reward_workers_range)  # refused here

    @property
    def pool_sizes(self) -> dict[str, PoolSize]:
        """reward_workers and reward_workers_range, typed: reward name -> its pool's size."""
        return parse_pool_sizes(self.reward_workers, self.reward_workers_range)


@dataclass(frozen=True)
class Config:
    task: Task = "compressibility"
    """Task preset, whose settings are the defaults of every other flag."""
    model: str = "tiny"
    """`tiny`, a local diffusers pipeline directory, or a hub id (CompVis/stable-diffusion-v1-4)."""
    reward: str = "jpeg_compressibility"
    """Reward name (see `rewards.REWARDS`) or a weighted sum like aesthetic+0.5*alignment."""
    reward_options: Annotated[tuple[str, ...], alias("--reward-model")] = ()
    """KEY=VALUE options for the reward models (e.g. mlp=./sac+logos+ava1-l14-linearMSE.pth)."""
    prompts: tyro.conf.Suppress[tuple[str, ...]] = ()
    """The prompt set; each sample's prompt is drawn uniformly from it."""
    heldout_prompts: tyro.conf.Suppress[tuple[str, ...]] = ()
    """Prompts never trained on: every evaluation also scores the first `grid_prompts` of them
    with the grid's seeds, to see whether what is learned carries over (the paper, sec. 6.3)."""
    seed: int = 0
    guard: str | None = None
    """REWARD[:MAX_DROP]: a reward not trained on that scores every evaluation; when it falls,
    paired and significantly, more than MAX_DROP below its start, the run stops (or warns, see
    guard_action). E.g. aesthetic:0.5 while training compressibility."""
    guard_action: Literal["stop", "warn"] = "stop"
    """What a fired guard does: stop the run (it finishes as at its last epoch) or only warn."""
    grid_prompts: int = 4
    """Fixed prompts (the first of the set) in the image grids and evaluations."""
    grid_seeds: int = 4
    """Fixed seeds per grid prompt; the grid's samples are also scored (eval.jsonl)."""
    run: RunConfig = field(default_factory=RunConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stat_tracker: StatTrackerConfig = field(default_factory=StatTrackerConfig)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ConfigError("the prompt set is empty; give a task preset or --prompts FILE")
        for i, prompt in enumerate(self.prompts):
            problem = prompt_problem(prompt)
            if problem:
                raise ConfigError(f"prompt {i + 1} of the prompt set {problem}")
        for i, prompt in enumerate(self.heldout_prompts):
            problem = prompt_problem(prompt)
            if problem:
                raise ConfigError(f"held-out prompt {i + 1} {problem}")
        trained = sorted(set(self.heldout_prompts) & set(self.prompts))
        if trained:
            raise ConfigError(
                f"held-out prompts are also training prompts: {trained[:3]}; a held-out prompt "
                "must never be trained on, so remove it from one of the two sets"
            )
        if not 0 <= self.seed < 2**63:
            raise ConfigError(
                f"seed={self.seed} must be in [0, 2**63): it seeds numpy and torch generators"
            )
        samplers, calls = self.system.num_samplers, self.sample.num_batches_per_epoch
        if samplers > calls and self.system.mode == "sync":
            raise ConfigError(
                f"system.num_samplers={samplers} exceeds sample.num_batches_per_epoch={calls}: "
                "in sync mode a sampler makes whole calls of sample.batch_size, so some would "
                "idle; use fewer samplers or more, smaller calls"
            )
        learners = self.system.num_learners
        if self.train.batch_size % learners:
            raise ConfigError(
                f"train.batch_size={self.train.batch_size} does not divide over "
                f"system.num_learners={learners}: each learner takes an equal share of every "
                "minibatch; use a number of learners that divides it"
            )
        per_step = self.train.batch_size * self.train.gradient_accumulation_steps
        if self.samples_per_epoch % per_step:
            raise ConfigError(
                f"{self.samples_per_epoch} samples per epoch (sample.batch_size x "
                f"num_batches_per_epoch) do not divide into optimizer steps of {per_step} "
                "(train.batch_size x gradient_accumulation_steps); change one of them"
            )

    @property
    def samples_per_epoch(self) -> int:
        return self.sample.batch_size * self.sample.num_batches_per_epoch

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        """The inverse of `dataclasses.asdict` after a JSON round trip (RUN_DIR/config.json);
        also reads the flat layout of runs written before the sub-configs."""
        return from_dict(cls, _nested(data), "config")


def resumable_changes(saved: Config, wanted: Config) -> list[str]:
    """The fields, outside `run`, in which `wanted` differs from the run's `saved` config, as
    dotted names (`train.clip_range`): what a resume may not change."""
    return [name for name in differences(saved, wanted) if not name.startswith("run.")]


def _nested(data: dict) -> dict:
    """A config.json of the flat layout (before run/system) moved into the sub-configs; a
    nested one unchanged."""
    moved = {"run_dir": ("run", "dir")} | {
        f.name: (group, f.name)
        for group, cls in (("run", RunConfig), ("system", SystemConfig))
        for f in dataclasses.fields(cls)
    }
    out: dict[str, Any] = {}
    for name, value in data.items():
        if name in moved and name not in {f.name for f in dataclasses.fields(Config)}:
            group, field_name = moved[name]
            out.setdefault(group, {})[field_name] = value
        else:
            out[name] = value
    return out
