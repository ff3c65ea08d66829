"""Sync vs async with one sampler and the learner, each pinned to one torch thread.

    python bench/async_speedup.py --epochs 30

The tiny compressibility preset (32 samples an epoch, 20 DDIM steps, CFG 5), run once in sync
mode (sample, score, train in turn) and once in async mode (the sampler never waits for the
learner, --max-staleness 1), each for --epochs updates of 32 trained samples. With one thread
each, sync leaves one core idle at every moment; async can use both, so its speed-up on 2 cores
is at most 2 (the issue's goal: at least 1.6, with reward curves that overlap within noise).
The mean s/epoch leaves out epoch 0 (start-up). Prints a table and writes
bench/results/async_speedup.json and async_speedup.png (reward mean vs samples trained).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tyro
from common import describe, machine, markdown_table, write_json

from actors.sampler import Sampler
from ddpo.config import override
from ddpo.presets import task_config
from learner.driver import Driver
from learner.fleet import local_role_resources
from learner.learner import Learner
from learner.wiring import OnRay


@dataclass(frozen=True)
class Args:
    epochs: int = 30
    """Updates per mode (sync epochs, async updates), 32 trained samples each."""
    max_staleness: int = 1
    """async: train on batches at most this many policy versions old."""
    threads: int = 1
    """torch threads of the sampler and of the learner, in both modes."""
    out: Path = Path("bench/results/async_speedup.json")
    plot: Path = Path("bench/results/async_speedup.png")


class Pinned(OnRay):
    """OnRay, but the sampler and the learner get `threads` torch threads in both modes (the
    Driver gives a lone sync sampler, and the sync learner, every core)."""

    def __init__(self, threads: int):
        super().__init__(None, min_cpus=0, resources={})  # joins the ray.init of run_mode
        self.threads = threads

    def create(self, cls: type, *args: Any, options: dict | None = None) -> Any:
        if cls is Sampler:  # Sampler(config, sampler_id, threads)
            args = (*args[:2], self.threads)
        elif cls is Learner:  # Learner(config, threads)
            args = (args[0], self.threads)
        return super().create(cls, *args, options=options)


def run_mode(mode: Literal["sync", "async"], args: Args) -> dict:
    """One run on a fresh local Ray instance; its per-epoch records, accounting and evaluation."""
    import ray

    config = task_config("compressibility", "tiny")
    resources = {"sampler": 1, "learner": 1} | local_role_resources(config.reward)
    ray.init(
        address="local",
        num_cpus=4,
        resources=resources,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = override(
                config,
                {
                    "run": {"epochs": args.epochs, "dir": Path(tmp)},
                    "system": {"mode": mode, "max_staleness": args.max_staleness},
                },
            )
            history = Driver(config, Pinned(args.threads)).run()
            evals = [json.loads(line) for line in (Path(tmp) / "eval.jsonl").open()]
            accounting = Path(tmp) / "accounting.json"
            totals = json.loads(accounting.read_text()) if accounting.exists() else None
    finally:
        ray.shutdown()
    seconds = [h["seconds"] for h in history[1:]] or [history[0]["seconds"]]
    bound = None
    if mode == "async":  # S and T from the busy times: (S + T) / max(S, T) bounds the speed-up
        last = history[-1]
        sample = last["busy/sampler"] * last["wall_seconds"] / last["total/batches_sampled"]
        sample *= config.sample.num_batches_per_epoch  # S: sampling one epoch's 32 samples
        update = last["busy/learner"] * last["wall_seconds"] / len(history)  # T: one update
        bound = {"sample_seconds": sample, "update_seconds": update}
        bound["speedup_bound"] = (sample + update) / max(sample, update)
    return {
        "busy_times": bound,
        "epoch_seconds_mean": float(np.mean(seconds)),
        "epoch_seconds_std": float(np.std(seconds)),
        "samples_per_second": float(np.mean([h["samples"] for h in history]) / np.mean(seconds)),
        "eval_start": evals[0]["reward_mean"],
        "eval_end": evals[-1]["reward_mean"],
        "accounting": totals,
        "epochs": [
            {k: h.get(k) for k in ("epoch", "reward_mean", "reward_std", "samples", "seconds")}
            | {"busy/sampler": h.get("busy/sampler"), "busy/learner": h.get("busy/learner")}
            for h in history
        ],
    }


def plot(results: dict[str, dict], path: Path) -> None:
    """Reward mean vs samples trained, with a band of one standard error of each epoch's mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, r in results.items():
        samples = np.cumsum([e["samples"] for e in r["epochs"]])
        mean = np.array([e["reward_mean"] for e in r["epochs"]])
        sem = np.array([e["reward_std"] / np.sqrt(e["samples"]) for e in r["epochs"]])
        ax.plot(samples, mean, label=mode)
        ax.fill_between(samples, mean - sem, mean + sem, alpha=0.25)
    ax.set_xlabel("samples trained")
    ax.set_ylabel("reward mean (-JPEG kB)")
    ax.set_title("tiny compressibility: sync vs async, 1 thread each")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(args: Args) -> None:
    facts = machine()
    results = {"sync": run_mode("sync", args), "async": run_mode("async", args)}
    speedup = results["sync"]["epoch_seconds_mean"] / results["async"]["epoch_seconds_mean"]
    rows = [
        [
            f"{mode}" + (f", K={args.max_staleness}" if mode == "async" else ""),
            r["epoch_seconds_mean"],
            r["epoch_seconds_std"],
            r["samples_per_second"],
            r["eval_start"],
            r["eval_end"],
        ]
        for mode, r in results.items()
    ]
    print(f"\n{describe(facts)}; sampler and learner {args.threads} thread(s) each\n")
    header = ["mode", "s/epoch", "std", "samples/s", "eval reward start", "eval reward end"]
    print(markdown_table(header, rows))
    print(f"\nasync speed-up: {speedup:.2f}x (goal >= 1.6)")
    if bound := results["async"]["busy_times"]:
        print(
            f"async busy times: sampling 32 samples S = {bound['sample_seconds']:.2f} s, one "
            f"update T = {bound['update_seconds']:.2f} s; on one core each the speed-up is at "
            f"most (S + T) / max(S, T) = {bound['speedup_bound']:.2f}"
        )
    if results["async"]["accounting"]:
        print(f"async accounting: {results['async']['accounting']}")
    plot(results, args.plot)
    write_json(
        args.out,
        {"machine": facts, "args": dataclasses.asdict(args), "speedup": speedup} | results,
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
