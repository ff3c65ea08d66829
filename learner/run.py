"""Fine-tune a diffusion model with DDPO on Ray.

    python -m learner.run --task compressibility --model tiny      # the demo, a few CPU minutes
    python -m learner.run --task alignment --model CompVis/stable-diffusion-v1-4 --address auto

Starts a local Ray instance (or joins --address), creates the sampler actors, a reward actor and
the learner actor, and runs sync DDPO epochs: publish the LoRA weights, sample, score, compute
advantages, update. The run directory gets config.json, metrics.jsonl, image grids and the LoRA.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import tyro

from ddpo.config import Config, read_prompt_file, task_config
from ddpo.policy import ModelLoadError
from learner import checkpoint
from learner.checkpoint import Checkpoint, CheckpointError
from learner.driver import Driver, checked_log_cuts, train  # noqa: F401  (Driver: the API)
from learner.errors import ActorsPending, LearnerLost, RewardBroken
from learner.evaluation import paired_gain, read_evals
from learner.preflight import (
    changed_settings,
    check_config,
    check_writable,
    earlier_attempt,
    refuse_existing,
)
from learner.wiring import InProcess

log = logging.getLogger("learner.run")


@dataclass(frozen=True)
class Args:
    """DDPO fine-tuning of Stable Diffusion with LoRA, on Ray."""

    task: Literal["compressibility", "incompressibility", "aesthetic", "alignment"] = (
        "compressibility"
    )
    """Task preset: compressibility, incompressibility, aesthetic or alignment."""
    model: str = "tiny"
    """`tiny` (the embedded model), a local pipeline directory, or a hub id."""
    epochs: int | None = None
    """Training epochs (default: the task's)."""
    run_dir: Path | None = None
    """Output directory (default runs/<task>-<time>)."""
    seed: int = 0
    address: str | None = None
    """Ray cluster to join (e.g. auto); default starts a local Ray instance."""
    pending_timeout: float | None = None
    """Stop if actors cannot start for this many seconds on a cluster that no autoscaler can
    grow (default 300; 0 waits on); every 30 s the run says what they wait for."""
    num_samplers: int = 1
    """Sampler actors."""
    num_learners: int = 1
    """Data-parallel learner actors (one GPU each with --device cuda); train.batch_size must
    divide over them."""
    learner_placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement strategy of the learner group: PACK (one multi-GPU node if one has room) or
    STRICT_SPREAD (one rank per node)."""
    mode: Literal["sync", "async"] = "sync"
    """sync (the reference) or async (samplers never wait for the learner)."""
    max_staleness: int = 1
    """async: train on batches at most this many policy versions old; drop older ones."""
    prompts: Path | None = None
    """Read the prompt set from this file, one prompt a line (the task's held-out prompts are
    then dropped: they were chosen against the task's own prompts)."""
    heldout_prompts: Path | None = None
    """Read the held-out prompts, never trained on and scored at every evaluation, from this
    file."""
    learning_rate: float | None = None
    """Override the task's learning rate."""
    kl_coef: float | None = None
    """Add this times the per-step KL to the base model to the loss (default: the task's, 0)."""
    reward: str | None = None
    """Override the task's reward: a name or a weighted sum like aesthetic+0.5*alignment."""
    reward_workers: tuple[str, ...] = ()
    """Reward actors per reward at start, NAME=N (e.g. aesthetic=4)."""
    reward_workers_range: tuple[str, ...] = ()
    """Let a reward pool grow/shrink with its backlog within NAME=MIN:MAX (e.g. aesthetic=1:8)."""
    reward_model: tuple[str, ...] = ()
    """Reward model options KEY=VALUE, e.g. mlp=./sac+logos+ava1-l14-linearMSE.pth llava=DIR."""
    reward_url: tuple[str, ...] = ()
    """NAME=URL: score reward NAME with a reward service (python -m rewards.serve) at URL;
    its token from $DDPO_REWARD_TOKEN where the reward actors run."""
    device: str = "cpu"
    """cpu or cuda."""
    in_process: bool = False
    """Run every part in this process without Ray (debugging)."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (0 picks a free one)."""
    metrics_host: str = "127.0.0.1"
    """Interface for the metrics endpoint (0.0.0.0 to be scraped from other hosts)."""
    grid_every: int = 0
    """Save an image grid of fixed prompts and seeds every N epochs (0: start and end only)."""
    eval_every: int | None = None
    """Score the fixed evaluation samples every N epochs (eval.jsonl; 0: start and end only;
    default: the task's)."""
    guard: str | None = None
    """REWARD[:MAX_DROP]: score every evaluation with this reward, not trained on, and stop when
    it falls more than MAX_DROP below its start (paired, significantly), e.g. aesthetic:0.5."""
    guard_action: Literal["stop", "warn"] = "stop"
    """What a fired --guard does."""
    tensorboard: bool = False
    """Also log to RUN_DIR/tensorboard (needs the tensorboard package)."""
    save_every: int | None = None
    """Checkpoint every N epochs and at the end (default 5; 0 turns checkpoints off)."""
    keep_checkpoints: int | None = None
    """Checkpoints to keep in RUN_DIR/checkpoints (default 3, the newest)."""
    resume: Path | None = None
    """Continue the run in this directory from its newest intact checkpoint, with its settings
    (--epochs may extend it)."""
    resume_or_start: bool = False
    """Continue the run in --run-dir from its newest intact checkpoint if it has one (these flags
    must match its settings), else start it: what a retried job (a KubeRay RayJob) runs."""
    auto_resume: bool = False
    """If the learner is lost, start a new one from the last checkpoint instead of stopping."""
    print_config: bool = False
    """Print the resolved configuration, with the sizes that follow from it, as JSON and exit:
    starts nothing and writes nothing."""


RESUME_FLAGS = {
    "resume", "epochs", "address", "in_process", "metrics_port", "metrics_host", "grid_every",
    "eval_every", "pending_timeout", "print_config",
    "tensorboard", "save_every", "keep_checkpoints", "auto_resume",
}  # fmt: skip
"""What --resume may change; everything else comes from the run's checkpoint."""

INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as a shell reports it."""


def build_config(args: Args) -> Config:
    config = task_config(args.task, args.model)
    train = config.train
    if args.learning_rate is not None:
        train = dataclasses.replace(train, learning_rate=args.learning_rate)
    if args.kl_coef is not None:
        train = dataclasses.replace(train, kl_coef=args.kl_coef)
    prompts = read_prompt_file(args.prompts) if args.prompts else config.prompts
    heldout = () if args.prompts else config.heldout_prompts
    if args.heldout_prompts:
        heldout = read_prompt_file(args.heldout_prompts)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return dataclasses.replace(
        config,
        epochs=config.epochs if args.epochs is None else args.epochs,
        run_dir=args.run_dir or Path("runs") / f"{args.task}-{stamp}",
        seed=args.seed,
        address=args.address,
        num_samplers=args.num_samplers,
        num_learners=args.num_learners,
        learner_placement=args.learner_placement,
        mode=args.mode,
        max_staleness=args.max_staleness,
        prompts=prompts,
        heldout_prompts=heldout,
        reward=args.reward or config.reward,
        reward_options=args.reward_model,
        reward_urls=args.reward_url,
        reward_workers=args.reward_workers,
        reward_workers_range=args.reward_workers_range,
        device=args.device,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        grid_every=args.grid_every,
        eval_every=config.eval_every if args.eval_every is None else args.eval_every,
        guard=args.guard,
        guard_action=args.guard_action,
        tensorboard=args.tensorboard,
        train=train,
        **run_options(args),
    )


def run_options(args: Args) -> dict:
    """The Config fields that a fresh run and a resumed one both take from the command line."""
    options: dict[str, Any] = {"auto_resume": args.auto_resume}
    if args.save_every is not None:
        options["save_every"] = args.save_every
    if args.keep_checkpoints is not None:
        options["keep_checkpoints"] = args.keep_checkpoints
    if args.pending_timeout is not None:
        options["pending_timeout_s"] = args.pending_timeout
    return options


def resume_config(args: Args) -> tuple[Config, Checkpoint]:
    """--resume RUN_DIR: the run's config from its newest intact checkpoint, and that checkpoint."""
    run_dir = Path(args.resume or ".")
    if not run_dir.is_dir():
        raise ValueError(f"--resume {run_dir}: no such directory; give a run directory")
    fixed = [f.name for f in dataclasses.fields(Args) if f.name not in RESUME_FLAGS]
    changed = [n for n in fixed if getattr(args, n) != getattr(Args(), n)]
    changed = [n for n in changed if not (n == "run_dir" and args.run_dir == run_dir)]
    if changed:
        flags = ", ".join("--" + n.replace("_", "-") for n in changed)
        raise ValueError(f"--resume takes the run's settings from its checkpoint; drop {flags}")
    ckpt = checkpoint.latest(run_dir)
    if ckpt is None:
        raise ValueError(
            f"--resume {run_dir}: no intact checkpoint in {checkpoint.checkpoint_dir(run_dir)}; "
            "nothing to resume (start the run again without --resume)"
        )
    return continued(args, run_dir, ckpt), ckpt


def continued(args: Args, run_dir: Path, ckpt: Checkpoint) -> Config:
    """The config of the run that `ckpt` continues, with what the command line may change;
    every field of its state.json checked first (tensor shapes: when the learner loads them)."""
    config = checkpoint.check_state(ckpt.state, ckpt.path)
    checked_log_cuts(run_dir, ckpt.state["driver"]["logs"])  # refuse bad paths
    changes: dict[str, Any] = dict(
        run_dir=run_dir, address=args.address, grid_every=args.grid_every
    )
    if args.eval_every is not None:
        changes["eval_every"] = args.eval_every
    changes |= dict(metrics_port=args.metrics_port, metrics_host=args.metrics_host)
    changes |= dict(tensorboard=args.tensorboard or config.tensorboard, **run_options(args))
    if args.epochs is not None:
        if args.epochs < ckpt.epoch:
            raise ValueError(
                f"--epochs {args.epochs} is fewer than the {ckpt.epoch} epochs the checkpoint "
                f"has done; give --epochs {ckpt.epoch} or more"
            )
        changes["epochs"] = args.epochs
    config = dataclasses.replace(config, **changes)
    check_config(config)
    return config


def resume_or_start(args: Args) -> tuple[Config, Checkpoint | None]:
    """--resume-or-start --run-dir DIR: continue the run in DIR if it has a checkpoint, else
    start it; DIR may hold an attempt at the same run that stopped before its first checkpoint
    (it is started over), but never a different run."""
    wanted = build_config(args)
    run_dir = Path(str(wanted.run_dir))
    if args.run_dir is None or args.resume is not None:
        raise ValueError("--resume-or-start needs --run-dir DIR (and no --resume)")
    if not wanted.save_every:
        raise ValueError("--resume-or-start needs checkpoints; drop --save-every 0")
    ckpt = checkpoint.latest(run_dir) if run_dir.is_dir() else None
    if ckpt is not None:
        saved = checkpoint.check_state(ckpt.state, ckpt.path)
        changed = changed_settings(saved, wanted)
        if changed:
            raise ValueError(
                f"--resume-or-start: {run_dir} holds a run with other settings "
                f"({', '.join(changed)}); give its flags, or another --run-dir"
            )
        log.info("continuing the run in %s from %s", run_dir, ckpt.path)
        return continued(args, run_dir, ckpt), ckpt
    check_config(wanted)
    if run_dir.is_dir() and any(run_dir.iterdir()) and not earlier_attempt(run_dir, wanted):
        refuse_existing(run_dir)
    return wanted, None


def resolved(config: Config) -> dict[str, Any]:
    """The config as config.json holds it, and the sizes that follow from it: what a run with
    these flags would do (--print-config)."""
    per_step = config.train.batch_size * config.train.gradient_accumulation_steps
    calls = config.sample.num_batches_per_epoch
    split = [len(range(i, calls, config.num_samplers)) for i in range(config.num_samplers)]
    return dataclasses.asdict(config) | {
        "derived": {
            "samples_per_epoch": config.samples_per_epoch,
            "samples_per_optimizer_step": per_step,
            "optimizer_steps_per_epoch": config.samples_per_epoch
            // per_step
            * config.train.num_inner_epochs,
            "sampler_calls_per_sampler": split,
            "samples_per_learner_minibatch": config.train.batch_size // config.num_learners,
        }
    }


def plan(args: Args) -> tuple[Config, Checkpoint | None]:
    """The run to do, a new one or one continued from its checkpoint, after every check that
    can be made before the run directory is created or an actor starts."""
    if args.resume_or_start:
        config, ckpt = resume_or_start(args)
    elif args.resume:
        config, ckpt = resume_config(args)
    else:
        config, ckpt = build_config(args), None
        check_config(config)
        refuse_existing(Path(str(config.run_dir)))
    check_writable(Path(str(config.run_dir)))
    return config, ckpt


def fail(message: str, status: int) -> NoReturn:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(status)


def interrupted(run_dir: Path) -> NoReturn:
    """After Ctrl-C: one line on where the run stopped and how to go on."""
    ckpt = checkpoint.latest(run_dir) if run_dir.is_dir() else None
    if ckpt is None:
        fail(
            f"interrupted before the first checkpoint; nothing to resume: start again with the "
            f"same flags and --resume-or-start --run-dir {run_dir}",
            INTERRUPTED,
        )
    fail(
        f"interrupted at epoch {ckpt.epoch}; resume with: python -m learner.run --resume {run_dir}",
        INTERRUPTED,
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = tyro.cli(Args, args=argv)
    if args.print_config:
        try:
            config = resume_config(args)[0] if args.resume else build_config(args)
        except (ValueError, ModelLoadError) as err:
            fail(f"error: {err}", 2)
        print(json.dumps(resolved(config), indent=2, default=str))
        return
    try:
        config, ckpt = plan(args)
        if args.in_process and config.num_learners > 1:
            raise ValueError(
                f"--in-process runs one learner, not num_learners={config.num_learners}: "
                "drop --in-process (a learner group needs a process a rank)"
            )
    except (ValueError, ModelLoadError) as err:
        fail(f"error: {err}", 2)
    start = time.time()
    try:
        history = train(config, InProcess() if args.in_process else None, ckpt)
    except CheckpointError as err:  # a checkpoint the model cannot take (found before any change)
        fail(f"error: {err}", 2)
    except (LearnerLost, RewardBroken) as err:
        fail(f"error: {err}", 1)
    except ActorsPending as err:  # the cluster cannot hold the run: nothing ran, fix and rerun
        fail(f"error: {err}", 2)
    except KeyboardInterrupt:
        interrupted(Path(str(config.run_dir)))
    if history:
        first, last = history[0], history[-1]
        print(
            f"done: {len(history)} epochs in {time.time() - start:.0f}s; epoch reward "
            f"{first['reward_mean']:+.4f} -> {last['reward_mean']:+.4f}"
        )
        evals = read_evals(Path(str(config.run_dir)))
        paired = ""
        if "rewards" in evals[0] and "rewards" in evals[-1]:  # older runs logged means only
            gain = paired_gain(evals[0]["rewards"], evals[-1]["rewards"])
            paired = f", paired gain {gain['mean']:+.4f} ± {gain['se']:.4f} (t {gain['t']:+.1f})"
        if "heldout" in evals[0] and "heldout" in evals[-1]:
            gain = paired_gain(evals[0]["heldout"]["rewards"], evals[-1]["heldout"]["rewards"])
            paired += (
                f"; held-out prompts {gain['mean']:+.4f} ± {gain['se']:.4f} (t {gain['t']:+.1f})"
            )
        if "kl_base" in evals[-1]:
            paired += f"; KL to the base model {evals[-1]['kl_base']:.2e}"
        best = Path(str(config.run_dir)) / "best" / "evaluation.json"
        if best.is_file():
            paired += f"; best evaluation at {json.loads(best.read_text())['when']} (best/)"
        if len(history) < config.epochs and config.guard:
            print(f"stopped early by the guard after {len(history)} epochs (see the warning)")
        print(
            f"evaluation ({evals[0]['samples']} fixed samples): reward "
            f"{evals[0]['reward_mean']:+.4f} -> {evals[-1]['reward_mean']:+.4f}{paired}; "
            f"run directory {config.run_dir} (index.html)"
        )


if __name__ == "__main__":
    main()
