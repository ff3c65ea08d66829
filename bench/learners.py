"""Learner scaling: one update on the same global batch by 1 and by 2 data-parallel learners.

    python bench/learners.py

The tiny compressibility preset's epoch (64 samples, 10 DDIM steps, minibatches of 32) is
sampled once in this process and put in the object store. Then, for each group size N, N
`Learner` actors (`learner.group.LearnerGroup`, gloo on CPU, one torch thread and one Ray CPU
each) train on it: one warm-up update, then `--updates` timed ones, each on the same samples
under fresh batch ids (a learner trains a batch id once). The time is the driver's wall clock
from the calls to the last rank's answer: fetching the trajectories, the ranks' shares of every
minibatch, the all-reduces. Speed-up = t(1) / t(N); efficiency = speed-up / N. The CPU seconds
the ranks' processes used during the update, summed, show the work that was added by splitting
it (they do not depend on what else runs on the machine as the wall time does).

On a machine of C cores, N learners of one thread each can use min(N, C) of them; the Ray
daemons and this driver take a little. Prints a table and writes bench/results/learners.json.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro
from common import describe, epoch_batches, machine, markdown_table, write_json

from ddpo.config import override
from ddpo.presets import task_config
from learner.group import LearnerGroup
from learner.learner import Learner
from learner.wiring import OnRay


@dataclass(frozen=True)
class Args:
    learners: tuple[int, ...] = (1, 2)
    """Group sizes to measure."""
    updates: int = 3
    """Timed updates per group size (after one warm-up update)."""
    out: Path = Path("bench/results/learners.json")


def time_group(wiring: OnRay, config, n: int, batches: list, updates: int) -> dict:
    import ray

    group = LearnerGroup(
        wiring,
        lambda placement: wiring.create(Learner, config, 1, options={"num_cpus": 1} | placement),
        n,
        {"CPU": 1},
        "PACK",
        Path(str(config.run.dir)),
    )
    rng = np.random.default_rng(0)
    advantages = rng.standard_normal(config.samples_per_epoch).astype(np.float32)

    def cpu_seconds() -> float:
        """CPU time the ranks' processes have used (all their threads), summed."""
        calls = [r.__ray_call__.remote(lambda self: time.process_time()) for r in group.ranks]
        return sum(ray.get(calls))

    def update(tag: str) -> tuple[float, float]:
        refs = [ray.put(dataclasses.replace(b, batch_id=f"{tag}-{b.batch_id}")) for b in batches]
        cpu, start = cpu_seconds(), time.perf_counter()
        group.gather(group.call_all("update", advantages, advantages, *refs))
        return time.perf_counter() - start, cpu_seconds() - cpu

    try:
        update("warm-up")  # the ranks started, joined and ran every code path once
        wall, cpu = zip(*[update(f"u{i}") for i in range(updates)], strict=True)
    finally:
        group.stop()
    return {
        "learners": n,
        "update_seconds": list(wall),
        "update_seconds_median": float(np.median(wall)),
        "rank_cpu_seconds_median": float(np.median(cpu)),
    }


def main(args: Args) -> None:
    import ray

    os.environ["DDPO_THREADS"] = "1"  # one torch thread in every learner
    facts = machine()
    facts["load_average_before"] = os.getloadavg()  # other work on the machine, if any
    config = override(task_config("compressibility", "tiny"), {"run.dir": Path("/tmp")})
    ray.init(num_cpus=max(args.learners), include_dashboard=False, log_to_driver=False)
    try:
        # The preset's epoch 0, sampled with the untrained policy: what each update trains on.
        batches = epoch_batches(Learner(config, threads=1).policy, config)
        wiring = OnRay(None, min_cpus=0, resources={})  # the instance above
        rows = [time_group(wiring, config, n, batches, args.updates) for n in args.learners]
    finally:
        ray.shutdown()
    facts["load_average_after"] = os.getloadavg()
    one = rows[0]["update_seconds_median"] * rows[0]["learners"]
    for r in rows:
        r["speedup"] = one / r["update_seconds_median"]
        r["efficiency"] = r["speedup"] / r["learners"]

    t = config.train
    print(f"\n{describe(facts)}")
    print(
        f"One update: {config.samples_per_epoch} samples x {config.sample.num_steps} steps, "
        f"minibatches of {t.batch_size}, {t.gradient_accumulation_steps} per optimizer step; "
        "one torch thread a learner.\n"
    )
    header = [
        "learners",
        "s/update (median)",
        "s/update (each)",
        "CPU s/update, all ranks",
        "speed-up",
        "efficiency",
    ]
    table = [
        [
            r["learners"],
            r["update_seconds_median"],
            ", ".join(f"{s:.2f}" for s in r["update_seconds"]),
            r["rank_cpu_seconds_median"],
            r["speedup"],
            r["efficiency"],
        ]
        for r in rows
    ]
    print(markdown_table(header, table))
    write_json(
        args.out,
        {
            "machine": facts,
            "args": dataclasses.asdict(args),
            "samples": config.samples_per_epoch,
            "num_steps": config.sample.num_steps,
            "train_batch_size": t.batch_size,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
