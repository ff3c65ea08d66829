"""Checkpoints: everything a run needs to go on exactly where it stopped, written atomically.

    RUN_DIR/checkpoints/epoch-000012/
        learner.safetensors  LoRA weights, AdamW moments and steps, the learner's RNG state
        state.json           policy version, epoch cursor, optimizer hyperparameters, stat-tracker
                             buffers, trained batch ids, driver counters, the run config
        metrics.jsonl        the metrics of every epoch so far
        MANIFEST.json        size and sha256 of each file above, written last

A checkpoint is built in a hidden temporary directory, every file fsynced, then renamed into
place, so a crash or a full disk leaves either the whole new checkpoint or none of it. Loading
checks the manifest; a checkpoint that fails the check is skipped with a warning and the one
before it is used. Only safetensors and JSON: nothing in a checkpoint is unpickled.

The other sources of randomness need no state: each epoch's prompts and noise seeds are a pure
function of (seed, epoch) (`learner.driver.epoch_schedule`), and samplers draw all noise from
those per-sample seeds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

TENSORS, STATE, METRICS, MANIFEST = (
    "learner.safetensors",
    "state.json",
    "metrics.jsonl",
    "MANIFEST.json",
)
FORMAT = 1


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for."""


@dataclass
class Checkpoint:
    """One loaded checkpoint: the learner's tensors and the JSON state of the run."""

    path: Path
    tensors: dict[str, torch.Tensor]  # "lora.*", "optim.<i>.<name>", "rng.generator"
    state: dict[str, Any]  # "epoch", "learner", "driver", "config", ...
    metrics: list[dict]

    @property
    def epoch(self) -> int:
        """Epochs (sync) or updates (async) completed: the run goes on with this one."""
        return int(self.state["epoch"])


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(
    run_dir: Path,
    epoch: int,
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    metrics: list[dict],
    keep: int,
) -> Path:
    """Write checkpoint `epoch` atomically and delete all but the newest `keep`. On any error
    (a full disk, say) the partial directory is removed and the error raised; older checkpoints
    are never touched before the new one is complete."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{epoch:06d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        # safetensors wants contiguous tensors that share no storage.
        save_file(
            {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, tmp / TENSORS
        )
        _write_text(
            tmp / STATE,
            json.dumps({"format": FORMAT, "epoch": epoch, **state}, indent=1, default=str),
        )
        _write_text(tmp / METRICS, "".join(json.dumps(m) + "\n" for m in metrics))
        _fsync(tmp / TENSORS)
        files = {name: _digest(tmp / name) for name in (TENSORS, STATE, METRICS)}
        _write_text(tmp / MANIFEST, json.dumps({"format": FORMAT, "files": files}, indent=1))
        _fsync(tmp)
        if final.exists():  # a leftover from before a resume (it failed its check, or is older)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(root.glob("epoch-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path) -> Checkpoint:
    """Load one checkpoint directory after checking every file against its manifest."""
    path = Path(path)
    problem = verify(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is unusable: {problem}")
    state = json.loads((path / STATE).read_text())
    metrics = [json.loads(line) for line in (path / METRICS).read_text().splitlines() if line]
    return Checkpoint(path, load_file(path / TENSORS), state, metrics)


def verify(path: Path) -> str | None:
    """None if the checkpoint at `path` is complete and intact, else what is wrong with it."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return "no MANIFEST.json (the write did not finish)"
    except (OSError, ValueError) as err:
        return f"unreadable MANIFEST.json ({err})"
    if manifest.get("format") != FORMAT:
        return f"format {manifest.get('format')!r}, this version reads {FORMAT}"
    for name in (TENSORS, STATE, METRICS):
        expected = manifest.get("files", {}).get(name)
        if not (path / name).is_file():
            return f"{name} is missing"
        if expected != _digest(path / name):
            return f"{name} does not match its checksum"
    return None


def latest(run_dir: Path) -> Checkpoint | None:
    """The newest intact checkpoint of a run; broken ones are skipped with a warning."""
    for path in sorted(checkpoint_dir(run_dir).glob("epoch-*"), reverse=True):
        problem = verify(path)
        if problem is None:
            return load(path)
        log.warning("skipping checkpoint %s: %s; trying the one before", path, problem)
    return None


# ----- optimizer and RNG state as flat tensors + JSON -----
def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors ("optim.<param>.<name>") and JSON."""
    full = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, per_param in full["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": full["param_groups"], "scalars": scalars}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            index, name = key.removeprefix("optim.").split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    # JSON turned tuples (AdamW's betas) into lists; give them back their type.
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
        for group in meta["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    """fsync a file, or a directory's entries (so a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}
