"""What Ray costs: the same tiny-model epochs in one process and through Ray (sync, 1 sampler).

    python bench/overhead.py --epochs 6

Both runs use the tiny compressibility preset with the same seeds, so they do the same work
(same prompts, noise, batch sizes); the first epoch (start-up, warm caches) is left out of the
mean. Prints a table and writes bench/results/overhead.json.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

from ddpo.config import override
from ddpo.presets import task_config
from learner.driver import train
from learner.wiring import InProcess

PHASES = ("publish", "sample_score", "update")


@dataclass(frozen=True)
class Args:
    epochs: int = 6
    out: Path = Path("bench/results/overhead.json")


def timed_run(epochs: int, in_process: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = override(
            task_config("compressibility", "tiny"), {"run.epochs": epochs, "run.dir": Path(tmp)}
        )
        start = time.time()
        history = train(config, InProcess() if in_process else None)
        total = time.time() - start
    per_epoch = [h["seconds"] for h in history[1:]]
    return {
        "epoch_seconds_mean": float(np.mean(per_epoch)),
        "epoch_seconds_std": float(np.std(per_epoch)),
        "total_seconds": total,
        # Where an epoch's time goes (wall time of each phase, epochs 1..N-1).
        "phases": {p: float(np.mean([h[f"seconds/{p}"] for h in history[1:]])) for p in PHASES},
        "rewards": [h["reward_mean"] for h in history],
    }


def main(args: Args) -> None:
    import ray

    plain = timed_run(args.epochs, in_process=True)
    # As learner.run does for its own local instance: workers at nice 0, a logical CPU per actor
    # (they take turns).
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    on_ray = timed_run(args.epochs, in_process=False)
    ray.shutdown()
    ratio = on_ray["epoch_seconds_mean"] / plain["epoch_seconds_mean"]
    print(f"{'':24s}{'s/epoch':>10s}{'std':>8s}{'total s':>10s}")
    for name, r in (("one process", plain), ("Ray sync, 1 sampler", on_ray)):
        print(
            f"{name:24s}{r['epoch_seconds_mean']:10.2f}{r['epoch_seconds_std']:8.2f}"
            f"{r['total_seconds']:10.1f}"
        )
    print(f"Ray / one process: {ratio:.3f}")
    print("seconds per epoch by phase: " + ", ".join(PHASES))
    for name, r in (("one process", plain), ("Ray sync, 1 sampler", on_ray)):
        print(f"{name:24s}" + "".join(f"{r['phases'][p]:10.3f}" for p in PHASES))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"one_process": plain, "ray_sync": on_ray, "ratio": ratio, "epochs": args.epochs},
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
