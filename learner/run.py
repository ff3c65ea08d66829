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
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tyro
from tqdm import tqdm

from actors.reward import RewardWorker
from actors.sampler import Sampler
from ddpo.config import Config, read_prompt_file, task_config
from ddpo.images import save_grid
from ddpo.lora import save_lora
from learner.learner import Learner
from learner.stat_tracker import PerPromptStatTracker, batch_advantages

log = logging.getLogger("learner.run")


@dataclass(frozen=True)
class Args:
    """DDPO fine-tuning of Stable Diffusion with LoRA, on Ray."""

    task: Literal["compressibility", "incompressibility", "aesthetic", "alignment"] = "compressibility"
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
    num_samplers: int = 1
    """Sampler actors."""
    prompts: Path | None = None
    """Read the prompt set from this file, one prompt a line."""
    learning_rate: float | None = None
    """Override the task's learning rate."""
    device: str = "cpu"
    """cpu or cuda."""
    in_process: bool = False
    """Run every part in this process without Ray (debugging)."""


def build_config(args: Args) -> Config:
    config = task_config(args.task, args.model)
    train = config.train
    if args.learning_rate is not None:
        train = dataclasses.replace(train, learning_rate=args.learning_rate)
    prompts = read_prompt_file(args.prompts) if args.prompts else config.prompts
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return dataclasses.replace(
        config,
        epochs=config.epochs if args.epochs is None else args.epochs,
        run_dir=args.run_dir or Path("runs") / f"{args.task}-{stamp}",
        seed=args.seed,
        address=args.address,
        num_samplers=args.num_samplers,
        prompts=prompts,
        device=args.device,
        train=train,
    )


# ----- wiring: the same loop runs on Ray or in one process -----
class InProcess:
    """Calls methods directly; results are plain values."""

    def create(self, cls: type, *args: Any, num_cpus: float = 1) -> Any:
        return cls(*args)

    def call(self, handle: Any, method: str, *args: Any, num_returns: int = 1) -> Any:
        return getattr(handle, method)(*args)

    def get(self, refs: Any) -> Any:
        return refs


class OnRay:
    """Actors and ObjectRefs; the driver never touches images or trajectories."""

    def __init__(self, address: str | None, min_cpus: int):
        import ray

        self.ray = ray
        if not ray.is_initialized():
            if address:
                ray.init(address=address)
            else:
                # Logical CPUs: in sync mode the actors take turns, so they may share the cores.
                ray.init(num_cpus=max(os.cpu_count() or 1, min_cpus))

    def create(self, cls: type, *args: Any, num_cpus: float = 1) -> Any:
        return self.ray.remote(cls).options(num_cpus=num_cpus).remote(*args)

    def call(self, handle: Any, method: str, *args: Any, num_returns: int = 1) -> Any:
        return getattr(handle, method).options(num_returns=num_returns).remote(*args)

    def get(self, refs: Any) -> Any:
        return self.ray.get(refs)


def epoch_schedule(config: Config, epoch: int) -> tuple[list[str], np.ndarray]:
    """The prompts and noise seeds of every sample of an epoch, a function of (seed, epoch)."""
    rng = np.random.default_rng([config.seed, epoch])
    n = config.samples_per_epoch
    prompts = [config.prompts[i] for i in rng.integers(len(config.prompts), size=n)]
    return prompts, rng.integers(0, 2**31 - 1, size=n, dtype=np.int64)


def grid_schedule(config: Config) -> tuple[list[str], np.ndarray]:
    """Fixed prompts and seeds for the image grids."""
    prompts = list(config.prompts[: config.grid_prompts])
    rows = [p for p in prompts for _ in range(config.grid_seeds)]
    seeds = np.tile(np.arange(config.grid_seeds, dtype=np.int64) + 10_000, len(prompts))
    return rows, seeds


def train(config: Config, wiring: InProcess | OnRay | None = None) -> list[dict]:
    """Run `config.epochs` sync DDPO epochs; return the per-epoch metrics."""
    run_dir = Path(config.run_dir or "runs/run")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2, default=str))
    wiring = wiring or OnRay(config.address, min_cpus=config.num_samplers + 2)
    threads = os.cpu_count() or 1

    samplers = [wiring.create(Sampler, config, i, threads) for i in range(config.num_samplers)]
    reward = wiring.create(RewardWorker, config.reward)
    learner = wiring.create(Learner, config)
    tracker = PerPromptStatTracker(config.stat_tracker.buffer_size, config.stat_tracker.min_count)

    def publish() -> int:
        # One object-store copy of the CPU LoRA state dict; every sampler gets its ref.
        version, state = wiring.call(learner, "weights", num_returns=2)
        wiring.get([wiring.call(s, "set_weights", version, state) for s in samplers])
        return wiring.get(version)

    def grid(name: str) -> None:
        prompts, seeds = grid_schedule(config)
        traj, _ = wiring.call(samplers[0], "sample", prompts, seeds, num_returns=2)
        save_grid(wiring.get(traj).images, run_dir / name, columns=config.grid_seeds)

    publish()
    grid("grid_start.png")
    history = []
    metrics_file = (run_dir / "metrics.jsonl").open("a")
    for epoch in range(config.epochs):
        start = time.time()
        version = publish()

        # Sample: each sampler takes every S-th batch; reward actors read images by ref.
        prompts, seeds = epoch_schedule(config, epoch)
        b = config.sample.batch_size
        trajs, scores = [], []
        for i in range(config.sample.num_batches_per_epoch):
            sl = slice(i * b, (i + 1) * b)
            sampler = samplers[i % len(samplers)]
            traj, reward_input = wiring.call(sampler, "sample", prompts[sl], seeds[sl], num_returns=2)
            trajs.append(traj)
            scores.append(wiring.call(reward, "score", reward_input))
        results = [
            wiring.get(s)
            for s in tqdm(scores, desc=f"epoch {epoch} sample+score", leave=False, disable=None)
        ]
        rewards = np.concatenate([r for r, _ in results])
        sample_prompts = [p for i in range(len(trajs)) for p in prompts[i * b : (i + 1) * b]]

        # Advantages, then one learner update on the epoch's trajectories.
        if config.stat_tracker.per_prompt:
            advantages = tracker.update(sample_prompts, rewards)
        else:
            advantages = batch_advantages(rewards)
        update = wiring.get(wiring.call(learner, "update", advantages, rewards, *trajs))

        record = {
            "epoch": epoch,
            "policy_version": version,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "loss": update.get("loss"),
            "approx_kl": update.get("approx_kl"),
            "clipfrac": update.get("clipfrac"),
            "grad_norm": update.get("grad_norm"),
            "samples": int(len(rewards)),
            "seconds": round(time.time() - start, 3),
        }
        history.append(record)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        print(
            f"epoch {epoch:3d}  v{version}  reward {record['reward_mean']:+.4f} "
            f"± {record['reward_std']:.4f}  loss {record['loss']:+.2e}  "
            f"kl {record['approx_kl']:.2e}  clipfrac {record['clipfrac'] or 0:.2f}  "
            f"{record['seconds']:.1f}s",
            flush=True,
        )
    metrics_file.close()

    publish()
    version, state = wiring.call(learner, "weights", num_returns=2)
    save_lora(wiring.get(state), run_dir / "lora")
    grid("grid_end.png")
    return history


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = tyro.cli(Args, args=argv)
    try:
        config = build_config(args)
    except ValueError as err:
        sys.exit(f"error: {err}")
    start = time.time()
    history = train(config, InProcess() if args.in_process else None)
    if history:
        first, last = history[0], history[-1]
        print(
            f"done: {len(history)} epochs in {time.time() - start:.0f}s; reward "
            f"{first['reward_mean']:+.4f} -> {last['reward_mean']:+.4f}; run directory {config.run_dir}"
        )


if __name__ == "__main__":
    main()
