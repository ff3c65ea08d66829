"""Metrics that actors report through `ray.util.metrics` (Ray's per-node exporter ships them to
the dashboard and Prometheus). Ray is imported lazily, so the actor classes stay importable and
usable without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "ddpo_"

# ----- actors: ray.util.metrics, exported by Ray's per-node metrics agent -----
SAMPLING_SECONDS_BUCKETS = [0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600]
REWARD_LATENCY_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]


@dataclass
class ActorMetrics:
    """`ray.util.metrics` objects for the actors; tag values go in each call's `tags`. Every
    metric also carries `run`, set once by `actor_metrics(run)`: the run directory's name, as on
    the driver's metrics, so that two runs in one Prometheus never share a series.

    samples_produced.inc(n, tags={"sampler_id": "0"})           # Counter
    sampling_seconds.observe(s, tags={"sampler_id": "0"})       # Histogram, one sampler call
    reward_latency.observe(s, tags={"reward": "aesthetic"})     # Histogram, one reward call
    queue_depth.set(n, tags={"queue": "reward_aesthetic"})      # Gauge
    """

    samples_produced: Any
    sampling_seconds: Any
    reward_latency: Any
    queue_depth: Any


def run_label(run_dir: str | Path | None) -> str:
    """The `run` label of a run's metrics, driver's and actors' alike: its directory's name."""
    return Path(run_dir or "runs/run").name


def actor_metrics(run: str = "") -> ActorMetrics:
    """Create the actor metrics of run `run` (`run_label`) (inside an actor or a driver connected
    to Ray; imports ray).

    Creating the same metric twice in a process is allowed by Ray; call this once per actor."""
    from ray.util.metrics import Counter, Gauge, Histogram

    metrics = ActorMetrics(
        samples_produced=Counter(
            PREFIX + "samples_produced",
            description="Trajectories sampled.",
            tag_keys=("sampler_id", "run"),
        ),
        sampling_seconds=Histogram(
            PREFIX + "sampling_seconds",
            description="Seconds per sampler call (one batch of trajectories).",
            boundaries=SAMPLING_SECONDS_BUCKETS,
            tag_keys=("sampler_id", "run"),
        ),
        reward_latency=Histogram(
            PREFIX + "reward_latency_seconds",
            description="Seconds from a reward request to its result, per reward.",
            boundaries=REWARD_LATENCY_BUCKETS,
            tag_keys=("reward", "run"),
        ),
        queue_depth=Gauge(
            PREFIX + "queue_depth",
            description="Items waiting in a queue (trajectories for the learner, reward requests).",
            tag_keys=("queue", "run"),
        ),
    )
    for metric in vars(metrics).values():
        metric.set_default_tags({"run": run})
    return metrics


def ray_actor_metrics(run: str = "") -> ActorMetrics | None:
    """`actor_metrics(run)` inside a Ray worker; None in a plain process (tests, --in-process)."""
    try:
        import ray
    except ImportError:
        return None
    return actor_metrics(run) if ray.is_initialized() else None
