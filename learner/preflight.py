"""Checks made before a run writes a file or starts an actor, so that a mistake costs one line
and nothing else: the config's rewards, their options and pool sizes, the model, and the run
directory (writable; empty for a new run, or holding the run that is to go on).

    check_config(config)        # ValueError (or ModelLoadError) saying what to change
    check_writable(run_dir)
    refuse_existing(run_dir)    # a new run never writes into another run's directory

The config's own fields (sizes, seed, prompts) are checked by `Config.__post_init__`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ddpo.config import Config, resumable_changes
from ddpo.policy import resolve_model
from learner import checkpoint
from learner.guard import Guard
from rewards import (
    REWARDS,
    parse_reward_options,
    parse_reward_spec,
    parse_reward_urls,
    reward_options,
)


def check_config(config: Config) -> None:
    """Everything about `config` that the driver and its actors would otherwise find out late:
    reward names and weights, reward options, pool sizes and their names, the model path."""
    terms = parse_reward_spec(config.reward)
    options = parse_reward_options(config.reward_options)
    reward_options(config.reward, options, tiny=config.model == "tiny")
    sizes = config.system.pool_sizes
    unknown = sorted(set(sizes) - {name for _, name in terms})
    if unknown:
        raise ValueError(
            f"--reward-workers names {unknown}, but the reward is {config.reward!r}; "
            "name one of its terms"
        )
    parse_reward_urls(config.system.reward_urls, config.reward)
    if config.guard:
        Guard.parse(config.guard, [name for _, name in terms], sorted(REWARDS))
    if config.guard_action not in ("stop", "warn"):
        raise ValueError(f"--guard-action {config.guard_action!r}: choose stop or warn")
    resolve_model(config.model)


def check_writable(run_dir: Path) -> None:
    """The run directory is a directory this process can write in (or can be created in one),
    tried with a probe that is removed at once."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--run-dir {run_dir} is not a directory; give a directory path")
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--run-dir {run_dir}: {existing} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ddpo-write-probe-", dir=existing))
    except OSError as err:
        raise ValueError(
            f"--run-dir {run_dir}: cannot write in {existing} ({err.strerror}); "
            "give a writable --run-dir"
        ) from None


def refuse_existing(run_dir: Path) -> None:
    """A new run starts only in an empty or new directory: writing into another run would
    overwrite its config, mix its metrics and checkpoints with this run's, and a later
    --resume would continue the wrong run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    ckpt = newest(run_dir)
    holds = f"a run (checkpoint at epoch {ckpt})" if ckpt is not None else "files"
    raise ValueError(
        f"--run-dir {run_dir} already holds {holds}; continue it with --resume {run_dir}, "
        "or give another --run-dir"
    )


def newest(run_dir: Path) -> int | None:
    """The epoch of the newest checkpoint directory of a run (intact or not), or None."""
    paths = checkpoint.checkpoints(run_dir)
    return checkpoint.epoch_of(paths[-1]) if paths else None


def earlier_attempt(run_dir: Path, wanted: Config) -> bool:
    """Whether a run directory without a checkpoint holds an attempt at this same run that
    stopped before its first checkpoint (its config.json has these settings): such a directory
    may be started over."""
    try:
        saved = Config.from_dict(json.loads((Path(run_dir) / "config.json").read_text()))
    except (OSError, ValueError, TypeError, AttributeError):
        return False
    return not resumable_changes(saved, wanted)
