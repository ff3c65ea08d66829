"""Throughput vs actors: samplers on a simulated multi-node cluster, and a reward pool.

    python bench/scaling.py

(a) Samplers: a `ray.cluster_utils.Cluster` with one node per sampler (1 CPU, resource
`sampler`), each sampler pinned to one torch thread, placed as `learner.driver` places them
(`role_options("sampler")`). The sampling stage alone: fixed batches of the tiny compressibility
preset (8 samples, 20 DDIM steps, CFG 5) sent straight to `Sampler.sample`, no learner, no
reward. Efficiency = throughput / (n x one sampler's throughput). The simulated nodes share this
machine's cores, so n samplers can only scale up to the number of physical cores.

(b) Reward pool: a `RewardPool` of 1, 2, 4 `RewardWorker`s whose reward sleeps a fixed time per
8 images (a cost that needs no CPU, like waiting on a GPU or a service), fed with all batches at
once through the pool's least-loaded dispatch. Efficiency = batches/s / (n / reward_seconds).

Prints two tables and writes bench/results/scaling.json.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro
from common import describe, machine, markdown_table, write_json

from actors.reward import RewardWorker
from actors.sampler import Sampler
from ddpo.pools import PoolSize
from ddpo.presets import task_config
from learner.driver import epoch_schedule
from learner.fleet import reward_actor_options, role_options
from learner.reward_pool import RewardPool
from learner.wiring import OnRay


@dataclass(frozen=True)
class Args:
    samplers: tuple[int, ...] = (1, 2, 4)
    """Sampler counts to measure; the cluster gets one sampler node per sampler."""
    batches: int = 3
    """Batches per sampler per measurement (after one warm-up batch each)."""
    pool_sizes: tuple[int, ...] = (1, 2, 4)
    """Reward pool sizes to measure."""
    reward_seconds: float = 0.25
    """Simulated reward cost: seconds of sleep per batch of 8 images."""
    reward_batches: int = 32
    """Batches scored per pool size."""
    out: Path = Path("bench/results/scaling.json")


def sleep_reward(seconds_per_image: float):
    """A reward whose cost is time, not CPU: sleeps in proportion to its images, so batches that
    a RewardWorker coalesces cost what they would one by one."""

    def fn(images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, dict]:
        time.sleep(seconds_per_image * len(images))
        return np.zeros(len(images), np.float32), {}

    return fn


class SleepWorker(RewardWorker):
    """RewardWorker("sleep"): registers the sleep reward in the actor's own process first."""

    def __init__(self, seconds_per_image: float):
        from rewards import REWARDS  # this process's registry (a global would travel as a copy)

        REWARDS["sleep"] = sleep_reward
        super().__init__("sleep", {"seconds_per_image": seconds_per_image})


def node_of(actor) -> str:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def sampler_throughput(wiring: OnRay, n: int, batches: int) -> dict:
    import ray

    config = task_config("compressibility", "tiny")
    options = role_options("sampler", gpu=False)
    actors = [wiring.create(Sampler, config, i, 1, options=options) for i in range(n)]
    b = config.sample.batch_size
    prompts, seeds = epoch_schedule(config, 0)

    def launch(actor):  # sample(prompts, seeds, min_version) -> (traj, reward input, meta) refs
        return wiring.call(actor, "sample", prompts[:b], seeds[:b], 0, num_returns=3)[2]

    ray.get([launch(a) for a in actors])  # warm-up: every sampler loaded and placed
    nodes = len({node_of(a) for a in actors})
    start = time.perf_counter()
    metas = ray.get([launch(a) for a in actors for _ in range(batches)])
    seconds = time.perf_counter() - start
    for actor in actors:
        wiring.kill(actor)
    samples = sum(m["samples"] for m in metas)
    return {
        "samplers": n,
        "nodes": nodes,
        "samples": samples,
        "seconds": seconds,
        "samples_per_second": samples / seconds,
        "batch_seconds_mean": float(np.mean([m["seconds"] for m in metas])),
    }


def pool_throughput(wiring: OnRay, n: int, args: Args) -> dict:
    import ray

    pool = RewardPool(
        "sleep",
        PoolSize(start=n, min=n, max=n),
        make_actor=lambda: wiring.create(
            SleepWorker, args.reward_seconds / 8, options=reward_actor_options("sleep")
        ),
        call=lambda actor, reward_input: wiring.call(actor, "score", reward_input),
        kill=wiring.kill,
    )
    batch = ray.put(
        {"images": np.zeros((8, 32, 32, 3), np.uint8), "prompts": ["a"] * 8, "batch_id": "b"}
    )
    ray.get([wiring.call(a, "score", batch) for a in pool.actors])  # warm-up: every actor up
    start = time.perf_counter()
    refs = [pool.score(batch) for _ in range(args.reward_batches)]
    ray.get(refs)
    seconds = time.perf_counter() - start
    for ref in refs:
        pool.done(ref)
    for actor in pool.actors:
        wiring.kill(actor)
    return {
        "actors": n,
        "batches": args.reward_batches,
        "seconds": seconds,
        "batches_per_second": args.reward_batches / seconds,
        "ideal_batches_per_second": n / args.reward_seconds,
    }


def main(args: Args) -> None:
    import ray
    from ray.cluster_utils import Cluster

    facts = machine()
    # A Cluster writes its address to <RAY_TMPDIR>/ray/ray_current_cluster, where any plain
    # `ray.init()` on this machine would find and join it: keep it in a directory of our own.
    tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths must fit
    os.environ["RAY_TMPDIR"] = tmp
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
    )
    try:
        for _ in range(max(args.samplers)):
            cluster.add_node(num_cpus=1, resources={"sampler": 1})
        biggest = max(args.pool_sizes)
        cluster.add_node(num_cpus=biggest, resources={"reward_sleep": biggest})
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        wiring = OnRay(None, min_cpus=0, resources={})  # joins the instance above
        samplers = [sampler_throughput(wiring, n, args.batches) for n in args.samplers]
        pools = [pool_throughput(wiring, n, args) for n in args.pool_sizes]
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    one = samplers[0]["samples_per_second"] / samplers[0]["samplers"]  # per sampler, first row
    for r in samplers:
        r["efficiency"] = r["samples_per_second"] / (r["samplers"] * one)
    for r in pools:  # the ideal is known here: n actors each finish a batch per reward_seconds
        r["efficiency"] = r["batches_per_second"] / r["ideal_batches_per_second"]

    print(f"\n{describe(facts)}")
    print(
        f"Every simulated node runs on these {facts['physical_cores']} cores: more samplers "
        "than cores share them, so their efficiency must fall.\n"
    )
    header = ["samplers", "nodes", "samples/s", "s/batch in sampler", "efficiency"]
    keys = ["samplers", "nodes", "samples_per_second", "batch_seconds_mean", "efficiency"]
    print(markdown_table(header, [[r[k] for k in keys] for r in samplers]))
    print(f"\nReward pool, reward sleeping {args.reward_seconds} s per batch of 8 images:\n")
    header = ["actors", "batches/s", "ideal batches/s", "efficiency"]
    keys = ["actors", "batches_per_second", "ideal_batches_per_second", "efficiency"]
    print(markdown_table(header, [[r[k] for k in keys] for r in pools]))
    write_json(
        args.out,
        {"machine": facts, "args": dataclasses.asdict(args), "samplers": samplers, "pool": pools},
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
