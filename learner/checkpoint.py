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

from ddpo.config import Config

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
    prune(root, epoch, keep)
    return final


def epoch_of(path: Path) -> int | None:
    """The epoch of a checkpoint directory `epoch-NNNNNN`, or None for any other name."""
    digits = path.name.removeprefix("epoch-")
    return int(digits) if path.name.startswith("epoch-") and digits.isdigit() else None


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, oldest first by epoch number (never by name: past
    epoch 999999 the names stop sorting as numbers)."""
    paths = [p for p in checkpoint_dir(run_dir).glob("epoch-*") if epoch_of(p) is not None]
    return sorted(paths, key=lambda p: epoch_of(p) or 0)


def prune(root: Path, written: int, keep: int) -> None:
    """After checkpoint `written`: keep the newest `keep` up to it, by epoch number. Any of a
    later epoch is left from before a resume (it failed its check, so the run went on from an
    older one) and describes a future this run no longer has: it goes too."""
    paths = checkpoints(root.parent)
    later = [p for p in paths if (epoch_of(p) or 0) > written]
    kept = [p for p in paths if (epoch_of(p) or 0) <= written]
    for old in later + kept[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


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
    for path in reversed(checkpoints(run_dir)):
        problem = verify(path)
        if problem is None:
            return load(path)
        log.warning("skipping checkpoint %s: %s; trying the one before", path, problem)
    return None


# ----- what a resume reads from state.json, checked before it changes anything -----
def check_state(state: Any, path: Path | str = "") -> Config:
    """Check every field of a checkpoint's state.json that a resume reads: its type, its range
    and how fields relate (the epoch lies within the run's epochs and equals the learner's policy
    version, one update per epoch or async update). Returns the run's config; raises ValueError
    naming the first bad field. The tensors' shapes are checked against the model by
    `Learner.check_state`, and the log cuts against the run directory by
    `learner.driver.checked_log_cuts`, both also before anything changes."""
    at = _Fields(str(Path(path) / STATE))
    at.mapping("", state, ("format", "epoch", "learner", "driver", "config"))
    if state["format"] != FORMAT:
        at.bad("format", state["format"], f"format {FORMAT}")
    at.mapping("config", state["config"], ())
    try:
        config = Config.from_dict(state["config"])
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{at.where('config')}: {err}{at.DAMAGED}") from None
    epoch = at.count("epoch", state["epoch"])
    if epoch > config.run.epochs:
        at.bad("epoch", epoch, f"an epoch within the run's {config.run.epochs}")
    learner = state["learner"]
    at.mapping("learner", learner, ("version", "optimizer", "trained_batches"))
    if at.count("learner.version", learner["version"]) != epoch:
        at.bad("learner.version", learner["version"], f"{epoch}, one version per epoch")
    at.strings("learner.trained_batches", learner["trained_batches"])
    optimizer = learner["optimizer"]
    at.mapping("learner.optimizer", optimizer, ("param_groups", "scalars"))
    at.items("learner.optimizer.param_groups", optimizer["param_groups"])
    for i, group in enumerate(optimizer["param_groups"]):
        at.mapping(f"learner.optimizer.param_groups.{i}", group, ("params",))
        field = f"learner.optimizer.param_groups.{i}"
        for j, index in enumerate(at.items(f"{field}.params", group["params"])):
            at.count(f"{field}.params.{j}", index)
        for name in ("lr", "eps", "weight_decay"):
            at.number(f"{field}.{name}", group.get(name, 0.0))
        betas = group.get("betas", [0.9, 0.999])
        if not (isinstance(betas, list) and len(betas) == 2):
            at.bad(f"{field}.betas", betas, "a pair of numbers")
        for j, beta in enumerate(betas):
            at.number(f"{field}.betas.{j}", beta)
    at.mapping("learner.optimizer.scalars", optimizer["scalars"], ())
    for key, value in optimizer["scalars"].items():
        index, _, name = key.partition(".")
        if not (index.isdigit() and name):
            at.bad(f"learner.optimizer.scalars key {key!r}", key, "<param index>.<name>")
        at.number(f"learner.optimizer.scalars.{key}", value)
    driver = state["driver"]
    at.mapping("driver", driver, ("tracker", "lost_batches", "logs"))
    at.mapping("driver.tracker", driver["tracker"], ())
    for prompt, rewards in driver["tracker"].items():
        for k, reward in enumerate(at.items(f"driver.tracker[{prompt[:40]!r}]", rewards)):
            at.number(f"driver.tracker[{prompt[:40]!r}].{k}", reward)
    at.count("driver.lost_batches", driver["lost_batches"])
    at.mapping("driver.logs", driver["logs"], ())  # names and sizes: checked_log_cuts
    # Async runs also keep their batch cursor, counters and the batches to sample again.
    if "next_batch" in driver:
        at.count("driver.next_batch", driver["next_batch"])
    if "totals" in driver:
        at.mapping("driver.totals", driver["totals"], ())
        for key, value in driver["totals"].items():
            at.count(f"driver.totals.{key}", value)
    for i, batch in enumerate(at.items("driver.retry", driver.get("retry", []))):
        if not (isinstance(batch, list) and len(batch) == 2):
            at.bad(f"driver.retry.{i}", batch, "a [prompts, seeds] pair")
        at.strings(f"driver.retry.{i}.prompts", batch[0])
        for k, seed in enumerate(at.items(f"driver.retry.{i}.seeds", batch[1])):
            at.count(f"driver.retry.{i}.seeds.{k}", seed)
    return config


class _Fields:
    """Type and range checks of JSON fields, each failure one line naming the field."""

    DAMAGED = "; this checkpoint is damaged or was tampered with"

    def __init__(self, file: str):
        self.file = file

    def where(self, field: str) -> str:
        return f"checkpoint {self.file}" + (f": {field}" if field else "")

    def bad(self, field: str, value: Any, wanted: str) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ValueError(f"{self.where(field)} is {shown}, not {wanted}{self.DAMAGED}")

    def mapping(self, field: str, value: Any, keys: tuple[str, ...]) -> dict:
        if not isinstance(value, dict):
            self.bad(field or "the file", type(value).__name__, "a JSON object")
        missing = [k for k in keys if k not in value]
        if missing:
            raise ValueError(f"{self.where(field)} lacks {', '.join(missing)}{self.DAMAGED}")
        return value

    def items(self, field: str, value: Any) -> list:
        if not isinstance(value, list):
            self.bad(field, value, "a list")
        return value

    def strings(self, field: str, value: Any) -> None:
        for i, item in enumerate(self.items(field, value)):
            if not isinstance(item, str):
                self.bad(f"{field}.{i}", item, "a string")

    def count(self, field: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            self.bad(field, value, "a whole number >= 0")
        return value

    def number(self, field: str, value: Any) -> None:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or value != value or value in (float("inf"), float("-inf")):
            self.bad(field, value, "a finite number")


def lora_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's LoRA tensors ("lora.<key>"), under the policy's own keys."""
    return {k.removeprefix("lora."): v for k, v in tensors.items() if k.startswith("lora.")}


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
