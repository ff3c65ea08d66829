"""Fine-tune a diffusion model with DDPO on Ray.

    python -m learner.run --task compressibility --model tiny      # the demo, a few CPU minutes
    python -m learner.run --task alignment --model CompVis/stable-diffusion-v1-4 --address auto
    python -m learner.run --task compressibility --train.clip-range 1e-3 --sample.num-steps 10
    python -m learner.run --resume runs/compressibility-20250101-120000 --epochs 60

Every field of `ddpo.config.Config` is a flag (tyro builds the command line from the config
classes and their docstrings), and its default is the --task preset's on --model or, with
--resume, the run's own. Starts a local Ray instance (or joins --address), creates the sampler
actors, the reward actors and the learner, and runs DDPO epochs (sync or async): publish the
LoRA weights, sample, score, compute advantages, update. The run directory gets config.json,
metrics.jsonl, image grids, checkpoints and the LoRA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import tyro

from ddpo.config import Config, ConfigError, Task, override, resumable_changes
from ddpo.policy import ModelLoadError
from ddpo.presets import task_config
from ddpo.prompt_text import read_prompt_file
from ddpo.trajectory import NonFiniteLogProbs
from learner import checkpoint
from learner.checkpoint import Checkpoint, CheckpointError
from learner.driver import Driver, checked_log_cuts, train  # noqa: F401  (Driver: the API)
from learner.errors import ActorsPending, LearnerLost, RewardBroken
from learner.evaluation import paired_gain, read_evals
from learner.preflight import check_config, check_writable, earlier_attempt, refuse_existing
from learner.wiring import InProcess

log = logging.getLogger(__name__)

PROG = "python -m learner.run"

INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as a shell reports it."""
TERMINATED = 143
"""Exit status after SIGTERM (128 + SIGTERM)."""


SIGTERM_RECEIVED = threading.Event()
"""Set when SIGTERM stopped the run: the KeyboardInterrupt it raises may reach `main` as a new
one (Ray's `ray.get` turns any interrupt inside it into a plain KeyboardInterrupt)."""


def stop_on_sigterm() -> None:
    """Take SIGTERM (`kill`, `ray job stop`, a scheduler's preemption) as Ctrl-C: every layer
    that checkpoints and shuts down on Ctrl-C then does so on SIGTERM too. Python's default
    would end the process on the spot: no checkpoint, and a local Ray instance's agents left
    running (its atexit hook never runs)."""

    def interrupt(signum: int, frame: Any) -> None:
        SIGTERM_RECEIVED.set()
        raise KeyboardInterrupt("SIGTERM")

    SIGTERM_RECEIVED.clear()
    if threading.current_thread() is threading.main_thread():  # only there can it be set
        signal.signal(signal.SIGTERM, interrupt)


@dataclass(frozen=True)
class Preset:
    """The flags that choose every other flag's default (read first)."""

    task: Task = "compressibility"
    model: str = "tiny"
    resume: Path | None = None


@dataclass(frozen=True)
class Command:
    """DDPO fine-tuning of Stable Diffusion with LoRA, on Ray. Every default is the --task
    preset's on --model (with --resume: the run's own)."""

    config: Annotated[Config, tyro.conf.arg(name="")]
    prompts: Path | None = None
    """Read the prompt set from this file, one prompt a line (the task's held-out prompts are
    then dropped: they were chosen against the task's own prompts)."""
    heldout_prompts: Path | None = None
    """Read the held-out prompts, never trained on and scored at every evaluation, from this
    file."""
    resume: Path | None = None
    """Continue the run in this directory from its newest intact checkpoint, with its settings;
    only the run.* flags (--epochs, --address, checkpoints, metrics) may change."""
    resume_or_start: bool = False
    """Continue the run in --run-dir from its newest intact checkpoint if it has one (these flags
    must match its settings), else start it: what a retried job (a KubeRay RayJob) runs."""
    in_process: bool = False
    """Run every part in this process without Ray (debugging)."""
    print_config: bool = False
    """Print the resolved configuration, with the sizes that follow from it, as JSON and exit:
    starts nothing and writes nothing."""


def parse(argv: list[str] | None = None) -> Command:
    """The command line over its defaults: the preset of --task and --model, or with --resume
    the config of the run's newest intact checkpoint."""
    argv = sys.argv[1:] if argv is None else argv
    preset = tyro.cli(Preset, args=argv, prog=PROG, return_unknown_args=True, add_help=False)[0]
    if preset.resume is not None:
        saved = resumable(preset.resume)[0]
        default = override(saved, {"run.dir": preset.resume})
    else:
        default = task_config(preset.task, preset.model)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return tyro.cli(Command, default=Command(default), args=argv, prog=PROG)
    except SystemExit as stop:
        error = config_error(stop)
        if error is not None:
            raise error from None
        sys.stderr.write(stderr.getvalue())
        raise


def config_error(stop: SystemExit) -> ConfigError | None:
    """The config check that made tyro stop, if one did: tyro draws it in a box, but the run's
    errors are one line."""
    cause = stop.__context__
    while cause is not None and not isinstance(cause, ConfigError):
        cause = cause.__cause__ or cause.__context__
    return cause


def fresh(command: Command) -> Config:
    """The config of a new run: the command's, with the prompt files read and a run directory."""
    config = command.config
    if command.prompts:
        prompts = read_prompt_file(command.prompts)
        config = dataclasses.replace(config, prompts=prompts, heldout_prompts=())
    if command.heldout_prompts:
        heldout = read_prompt_file(command.heldout_prompts)
        config = dataclasses.replace(config, heldout_prompts=heldout)
    if config.run.dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        config = override(config, {"run.dir": Path("runs") / f"{config.task}-{stamp}"})
    return config


def resumable(run_dir: Path) -> tuple[Config, Checkpoint]:
    """The config and newest intact checkpoint of the run in `run_dir`; every field of its
    state.json checked first (tensor shapes: when the learner loads them)."""
    if not run_dir.is_dir():
        raise ValueError(f"--resume {run_dir}: no such directory; give a run directory")
    ckpt = checkpoint.latest(run_dir)
    if ckpt is None:
        raise ValueError(
            f"--resume {run_dir}: no intact checkpoint in {checkpoint.checkpoint_dir(run_dir)}; "
            "nothing to resume (start the run again without --resume)"
        )
    config = checkpoint.check_state(ckpt.state, ckpt.path)
    checked_log_cuts(run_dir, ckpt.state["driver"]["logs"])  # refuse bad paths
    return config, ckpt


def resumed(command: Command) -> tuple[Config, Checkpoint]:
    """--resume RUN_DIR: the run's config with the run.* flags given, and its checkpoint."""
    run_dir = Path(str(command.resume))
    saved, ckpt = resumable(run_dir)
    config = command.config
    changed = resumable_changes(saved, config) + [
        name for name in ("prompts", "heldout_prompts") if getattr(command, name)
    ]
    if config.run.dir != run_dir:
        changed.append("run_dir")
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise ValueError(f"--resume takes the run's settings from its checkpoint; drop {flags}")
    return continued(config, ckpt), ckpt


def continued(config: Config, ckpt: Checkpoint) -> Config:
    """`config` checked as the config of a run continued from `ckpt`."""
    if config.run.epochs < ckpt.epoch:
        raise ValueError(
            f"--epochs {config.run.epochs} is fewer than the {ckpt.epoch} epochs the checkpoint "
            f"has done; give --epochs {ckpt.epoch} or more"
        )
    check_config(config)
    return config


def resume_or_start(command: Command) -> tuple[Config, Checkpoint | None]:
    """--resume-or-start --run-dir DIR: continue the run in DIR if it has a checkpoint, else
    start it; DIR may hold an attempt at the same run that stopped before its first checkpoint
    (it is started over), but never a different run."""
    if command.config.run.dir is None or command.resume is not None:
        raise ValueError("--resume-or-start needs --run-dir DIR (and no --resume)")
    wanted = fresh(command)
    run_dir = Path(str(wanted.run.dir))
    if not wanted.run.save_every:
        raise ValueError("--resume-or-start needs checkpoints; drop --save-every 0")
    if run_dir.is_dir() and checkpoint.latest(run_dir) is not None:
        saved, ckpt = resumable(run_dir)
        changed = resumable_changes(saved, wanted)
        if changed:
            raise ValueError(
                f"--resume-or-start: {run_dir} holds a run with other settings "
                f"({', '.join(changed)}); give its flags, or another --run-dir"
            )
        log.info("continuing the run in %s from %s", run_dir, ckpt.path)
        return continued(dataclasses.replace(saved, run=wanted.run), ckpt), ckpt
    check_config(wanted)
    if run_dir.is_dir() and any(run_dir.iterdir()) and not earlier_attempt(run_dir, wanted):
        refuse_existing(run_dir)
    return wanted, None


def resolved(config: Config) -> dict[str, Any]:
    """The config as config.json holds it, and the sizes that follow from it: what a run with
    these flags would do (--print-config)."""
    per_step = config.train.batch_size * config.train.gradient_accumulation_steps
    calls = config.sample.num_batches_per_epoch
    split = [
        len(range(i, calls, config.system.num_samplers)) for i in range(config.system.num_samplers)
    ]
    return dataclasses.asdict(config) | {
        "derived": {
            "samples_per_epoch": config.samples_per_epoch,
            "samples_per_optimizer_step": per_step,
            "optimizer_steps_per_epoch": config.samples_per_epoch
            // per_step
            * config.train.num_inner_epochs,
            "sampler_calls_per_sampler": split,
            "samples_per_learner_minibatch": config.train.batch_size // config.system.num_learners,
        }
    }


def plan(command: Command) -> tuple[Config, Checkpoint | None]:
    """The run to do, a new one or one continued from its checkpoint, after every check that
    can be made before the run directory is created or an actor starts."""
    if command.resume_or_start:
        config, ckpt = resume_or_start(command)
    elif command.resume:
        config, ckpt = resumed(command)
    else:
        config, ckpt = fresh(command), None
        check_config(config)
        refuse_existing(Path(str(config.run.dir)))
    check_writable(Path(str(config.run.dir)))
    return config, ckpt


def fail(message: str, status: int) -> NoReturn:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(status)


def diverged(err: BaseException, run_dir: Path) -> str:
    """What to say when a sampler drew non-finite log-probs: the weights have diverged."""
    return (
        f"a sampler drew non-finite log-probs ({err}): the weights have diverged. The approx_kl "
        f"of the last updates in {run_dir / 'metrics.jsonl'} shows when; the checkpoints in "
        f"{run_dir / 'checkpoints'} hold earlier weights. Start again with a lower "
        "--learning-rate, a smaller --train.clip-range, or --train.target-kl 0.03 (an update "
        "then stops before a step that moves the policy too far)"
    )


def interrupted(run_dir: Path) -> NoReturn:
    """After Ctrl-C or SIGTERM: one line on where the run stopped and how to go on."""
    terminated = SIGTERM_RECEIVED.is_set()
    what, code = ("terminated", TERMINATED) if terminated else ("interrupted", INTERRUPTED)
    ckpt = checkpoint.latest(run_dir) if run_dir.is_dir() else None
    if ckpt is None:
        fail(
            f"{what} before the first checkpoint; nothing to resume: start again with the "
            f"same flags and --resume-or-start --run-dir {run_dir}",
            code,
        )
    fail(
        f"{what} at epoch {ckpt.epoch}; resume with: python -m learner.run --resume {run_dir}", code
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop_on_sigterm()
    try:
        command = parse(argv)
        if command.print_config:
            config = resumed(command)[0] if command.resume else fresh(command)
            print(json.dumps(resolved(config), indent=2, default=str))
            return
        learners = command.config.system.num_learners
        if command.in_process and learners > 1:
            raise ValueError(
                f"--in-process runs one learner, not num_learners={learners}: drop "
                "--in-process (a learner group needs a process a rank)"
            )
        config, ckpt = plan(command)
    except (ValueError, ModelLoadError) as err:
        fail(f"error: {err}", 2)
    start = time.time()
    try:
        history = train(config, InProcess() if command.in_process else None, ckpt)
    except CheckpointError as err:  # a checkpoint the model cannot take (found before any change)
        fail(f"error: {err}", 2)
    except (LearnerLost, RewardBroken) as err:
        fail(f"error: {err}", 1)
    except NonFiniteLogProbs as err:  # through Ray, a RayTaskError that is also one
        fail(f"error: {diverged(getattr(err, 'cause', err), Path(str(config.run.dir)))}", 1)
    except ActorsPending as err:  # the cluster cannot hold the run: nothing ran, fix and rerun
        fail(f"error: {err}", 2)
    except KeyboardInterrupt:
        interrupted(Path(str(config.run.dir)))
    if history:
        first, last = history[0], history[-1]
        print(
            f"done: {len(history)} epochs in {time.time() - start:.0f}s; epoch reward "
            f"{first['reward_mean']:+.4f} -> {last['reward_mean']:+.4f}"
        )
        evals = read_evals(Path(str(config.run.dir)))
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
        best = Path(str(config.run.dir)) / "best" / "evaluation.json"
        if best.is_file():
            paired += f"; best evaluation at {json.loads(best.read_text())['when']} (best/)"
        if len(history) < config.run.epochs and config.guard:
            print(f"stopped early by the guard after {len(history)} epochs (see the warning)")
        print(
            f"evaluation ({evals[0]['samples']} fixed samples): reward "
            f"{evals[0]['reward_mean']:+.4f} -> {evals[-1]['reward_mean']:+.4f}{paired}; "
            f"run directory {config.run.dir} (index.html)"
        )


if __name__ == "__main__":
    main()
