"""What every benchmark script shares: the machine's facts, a markdown table, the JSON file."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

# The Ray instances the scripts start run workers at nice 0, as learner.run's own instance does
# (learner/wiring.py says why).
os.environ.setdefault("RAY_worker_niceness", "0")


def machine() -> dict[str, Any]:
    """Facts a number depends on: cores, memory, versions, date and commit."""
    import psutil
    import torch

    try:  # a GPU machine may have no Ray; the GPU benchmarks don't need it
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = None

    facts: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray_version,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:  # the model name is in /proc/cpuinfo on Linux
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        facts["cpu"] = next(s.split(":", 1)[1].strip() for s in lines if s.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        git = ["git", "rev-parse", "--short", "HEAD"]
        facts["commit"] = subprocess.run(git, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True)
        facts["uncommitted_changes"] = bool(dirty.stdout.strip())
    except OSError:
        pass
    return facts


def require_cuda(device: str, script: str, on_cpu: str) -> None:
    """Exit with one line when `device` is cuda and torch sees no GPU, naming the CPU check."""
    import sys

    import torch

    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            f"error: {script} needs a CUDA device, and torch {torch.__version__} sees none (a CPU "
            f"build, or no driver). To check the code path on CPU instead: {on_cpu}"
        )


def describe(facts: dict[str, Any]) -> str:
    """One line for the top of a table."""
    gpu = f", {facts['gpu']}" if facts.get("gpu") else ", no GPU"
    return (
        f"{facts['physical_cores']} physical cores ({facts['logical_cpus']} logical), "
        f"{facts['memory_gib']} GiB{gpu}; torch {facts['torch']}, Ray {facts['ray']}; "
        f"{facts['date']}"
    )


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; floats get 4 significant digits, None becomes a dash."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 10_000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def epoch_batches(policy: Any, config: Any, epoch: int = 0) -> list:
    """A run's epoch of samples as the driver schedules it (`learner.scoring.epoch_schedule`),
    sampled by `policy` in calls of sample.batch_size: what one update trains on."""
    from learner.scoring import epoch_schedule

    prompts, seeds = epoch_schedule(config, epoch)
    b = config.sample.batch_size
    return [
        policy.sample(prompts[i : i + b], seeds[i : i + b], batch_id=f"{epoch}-{i // b}")
        for i in range(0, len(prompts), b)
    ]


def time_sync_epochs(
    learners: dict[Any, Any], config: Any, rounds: int
) -> dict[tuple[Any, str], list[float]]:
    """Seconds of each learner's sync epochs, the learners alternating so that every one sees
    the same machine: each samples an epoch with its own weights (on policy, batch ids new at
    every round) and trains one update on it with fixed random advantages. Round 0 warms every
    learner up and is not timed. Returns {(key, "sample" | "update"): [seconds of each round]}."""
    import dataclasses
    import time

    import numpy as np

    advantages = np.random.default_rng(0).standard_normal(config.samples_per_epoch)
    advantages = advantages.astype(np.float32)
    times: dict[tuple[Any, str], list[float]] = {}
    for r in range(rounds + 1):
        for key, learner in learners.items():
            start = time.perf_counter()
            batches = [
                dataclasses.replace(t, policy_version=learner.version)
                for t in epoch_batches(learner.policy, config, epoch=r)
            ]
            sampled = time.perf_counter()
            learner.update(advantages, advantages, *batches)
            if r:
                times.setdefault((key, "sample"), []).append(sampled - start)
                times.setdefault((key, "update"), []).append(time.perf_counter() - sampled)
    return times
