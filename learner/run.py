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

from actors.reward import RewardWorker, local_role_resources, reward_actor_options
from actors.sampler import Sampler
from ddpo.config import Config, read_prompt_file, task_config
from ddpo.images import save_grid
from ddpo.lora import save_lora
from learner.learner import Learner
from learner.stat_tracker import PerPromptStatTracker, batch_advantages
from rewards import (
    combine_rewards,
    parse_reward_options,
    parse_reward_spec,
    reward_options,
    sample_records,
)

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
    num_samplers: int = 1
    """Sampler actors."""
    prompts: Path | None = None
    """Read the prompt set from this file, one prompt a line."""
    learning_rate: float | None = None
    """Override the task's learning rate."""
    reward: str | None = None
    """Override the task's reward: a name or a weighted sum like aesthetic+0.5*alignment."""
    reward_model: tuple[str, ...] = ()
    """Reward model options KEY=VALUE, e.g. mlp=./sac+logos+ava1-l14-linearMSE.pth llava=DIR."""
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
        reward=args.reward or config.reward,
        reward_options=args.reward_model,
        device=args.device,
        train=train,
    )


# ----- wiring: the same loop runs on Ray or in one process -----
class InProcess:
    """Calls methods directly; results are plain values."""

    def create(self, cls: type, *args: Any, options: dict | None = None) -> Any:
        return cls(*args)

    def call(self, handle: Any, method: str, *args: Any, num_returns: int = 1) -> Any:
        return getattr(handle, method)(*args)

    def get(self, refs: Any) -> Any:
        return refs


class OnRay:
    """Actors and ObjectRefs; the driver never touches images or trajectories."""

    def __init__(self, address: str | None, min_cpus: int, resources: dict[str, float]):
        import ray

        self.ray = ray
        if not ray.is_initialized():
            if address:
                ray.init(address=address)
            else:
                # Logical CPUs: in sync mode the actors take turns, so they may share the cores.
                ray.init(num_cpus=max(os.cpu_count() or 1, min_cpus), resources=resources)

    def create(self, cls: type, *args: Any, options: dict | None = None) -> Any:
        options = dict(options or {"num_cpus": 1})
        # Role resources place actors on their node type; a cluster without them (a plain
        # `ray start`) still runs everything, with a warning.
        available = self.ray.cluster_resources()
        wanted = options.pop("resources", {})
        missing = [name for name in wanted if name not in available]
        if missing:
            log.warning("cluster offers no %s resource; placing %s anywhere", missing, cls.__name__)
        resources = {k: v for k, v in wanted.items() if k in available}
        return self.ray.remote(cls).options(**options, resources=resources).remote(*args)

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


def format_record(record: dict) -> str:
    """One console line per epoch; metrics an algorithm does not produce are left out."""
    parts = [
        f"epoch {record['epoch']:3d}",
        f"v{record['policy_version']}",
        f"reward {record['reward_mean']:+.4f} ± {record['reward_std']:.4f}",
    ]
    for key, fmt in (("loss", "+.2e"), ("approx_kl", ".2e"), ("clipfrac", ".3f")):
        if record.get(key) is not None:
            parts.append(f"{key} {record[key]:{fmt}}")
    parts.append(f"{record['seconds']:.1f}s")
    return "  ".join(parts)


def train(config: Config, wiring: InProcess | OnRay | None = None) -> list[dict]:
    """Run `config.epochs` sync DDPO epochs; return the per-epoch metrics."""
    run_dir = Path(config.run_dir or "runs/run")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(
        json.dumps(dataclasses.asdict(config), indent=2, default=str)
    )
    terms = parse_reward_spec(config.reward)
    options = reward_options(
        config.reward, parse_reward_options(config.reward_options), tiny=config.model == "tiny"
    )
    wiring = wiring or OnRay(
        config.address,
        min_cpus=config.num_samplers + len(terms) + 1,
        resources=local_role_resources(config.reward),
    )

    # Sync mode: samplers run together, then the learner alone; split the cores accordingly.
    threads = os.cpu_count() or 1
    sampler_threads = max(1, threads // config.num_samplers)
    samplers = [
        wiring.create(Sampler, config, i, sampler_threads) for i in range(config.num_samplers)
    ]
    gpu = config.device.startswith("cuda")
    scorers = {
        name: wiring.create(
            RewardWorker, name, options[name], options=reward_actor_options(name, gpu=gpu)
        )
        for _, name in terms
    }
    learner = wiring.create(Learner, config, threads)
    tracker = PerPromptStatTracker(config.stat_tracker.buffer_size, config.stat_tracker.min_count)

    def publish() -> int:
        # One object-store copy of the CPU LoRA state dict; every sampler gets its ref.
        version, state = wiring.call(learner, "weights", num_returns=2)
        wiring.get([wiring.call(s, "set_weights", version, state) for s in samplers])
        return wiring.get(version)

    def score(reward_input: Any) -> dict[str, Any]:
        # Every reward reads the images from the object store by ref, not through the driver.
        return {name: wiring.call(w, "score", reward_input) for name, w in scorers.items()}

    def grid(name: str) -> None:
        prompts, seeds = grid_schedule(config)
        traj, _ = wiring.call(samplers[0], "sample", prompts, seeds, num_returns=2)
        save_grid(wiring.get(traj).images, run_dir / name, columns=config.grid_seeds)

    publish()
    grid("grid_start.png")
    history = []
    metrics_file = (run_dir / "metrics.jsonl").open("a")
    samples_file = (run_dir / "samples.jsonl").open("a")
    for epoch in range(config.epochs):
        start = time.time()
        version = publish()

        # Sample: each sampler takes every S-th batch of the epoch's prompts and seeds.
        prompts, seeds = epoch_schedule(config, epoch)
        b = config.sample.batch_size
        batches = []
        for i in range(config.sample.num_batches_per_epoch):
            sl = slice(i * b, (i + 1) * b)
            sampler = samplers[i % len(samplers)]
            traj, reward_input = wiring.call(
                sampler, "sample", prompts[sl], seeds[sl], num_returns=2
            )
            batches.append((traj, prompts[sl], score(reward_input)))

        # Score; a batch whose reward is not finite is dropped (and counted), never trained on.
        kept_trajs, kept_prompts, kept_rewards, dropped = [], [], [], 0
        bar = tqdm(batches, desc=f"epoch {epoch} sample+score", leave=False, disable=None)
        for traj, batch_prompts, refs in bar:
            results = {name: wiring.get(ref) for name, ref in refs.items()}
            rewards, info = combine_rewards(terms, results)
            if not np.isfinite(rewards).all():
                log.warning("epoch %d: dropping a batch with non-finite rewards %s", epoch, rewards)
                dropped += 1
                continue
            kept_trajs.append(traj)
            kept_prompts.extend(batch_prompts)
            kept_rewards.append(rewards)
            for record in sample_records(batch_prompts, rewards, info):
                samples_file.write(json.dumps({"epoch": epoch, **record}, default=float) + "\n")
        if not kept_trajs:
            raise RuntimeError(f"epoch {epoch}: every batch had non-finite rewards; stopping")
        rewards = np.concatenate(kept_rewards)

        # Advantages, then one learner update on the epoch's trajectories.
        if config.stat_tracker.per_prompt:
            advantages = tracker.update(kept_prompts, rewards)
        else:
            advantages = batch_advantages(rewards)
        update = wiring.get(wiring.call(learner, "update", advantages, rewards, *kept_trajs))

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
            "batches_dropped": dropped,
            "seconds": round(time.time() - start, 3),
        }
        history.append(record)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        samples_file.flush()
        print(format_record(record), flush=True)
    metrics_file.close()
    samples_file.close()

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
