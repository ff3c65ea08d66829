"""Memory of a run: peak RSS of every process, and RSS and object-store use epoch by epoch.

    python bench/memory.py --epochs 10                     # the tiny demo, sync
    python bench/memory.py --mode async --epochs 300       # the soak: is memory flat?

Runs the tiny compressibility demo through `learner.driver.Driver` on a local Ray instance. A
thread of this (the driver) process polls RUN_DIR/metrics.jsonl; after every epoch it records
the RSS of the driver, the sampler, the learner and the reward actors (/proc/<pid>/status) and
the bytes in use in Ray's object store. At the end: each process's peak RSS (VmHWM) and the
least-squares slope of each series in MB per epoch, fitted from epoch 1 on (epoch 0 allocates
the optimizer state and warms caches). Prints a table and writes bench/results/memory_<mode>.json.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tyro
from common import describe, machine, markdown_table, write_json

from ddpo.config import override
from ddpo.presets import task_config
from learner.driver import Driver
from learner.fleet import local_role_resources


@dataclass(frozen=True)
class Args:
    epochs: int = 10
    """Epochs (sync) or updates (async)."""
    mode: Literal["sync", "async"] = "sync"
    num_steps: int | None = None
    """Denoising steps (default: the preset's 20); a soak may use fewer to fit more updates."""
    poll: float = 0.5
    """Seconds between looks at metrics.jsonl."""
    out: Path | None = None
    """Default bench/results/memory_<mode>.json."""


def proc_mb(pid: int, field: str) -> float | None:
    """A field of /proc/<pid>/status (VmRSS: resident now, VmHWM: peak) in MB; None if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e6  # the kernel counts kB
    except OSError:
        pass
    return None


def object_store_mb(state) -> float | None:
    """MB in use in the object store (all nodes), as `ray memory --stats-only` reads them; Ray
    has no public call for it, so this uses its internal API and gives None if that moved."""
    try:
        from ray._private.internal_api import get_memory_info_reply

        return get_memory_info_reply(state).store_stats.object_store_bytes_used / 1e6
    except Exception:  # a missing number, not a failed benchmark
        return None


def cluster_state():
    """What `object_store_mb` asks (None if Ray's internal API moved)."""
    try:
        import ray
        from ray._private.internal_api import get_state_from_address

        return get_state_from_address(ray.get_runtime_context().gcs_address)
    except Exception:
        return None


class Monitor(threading.Thread):
    """Records one row {epoch, seconds, <process>: RSS MB, object_store: MB} at the start and
    per finished epoch (a new line in metrics.jsonl); keeps each process's last-read peak RSS
    (VmHWM only grows, and the driver ends its actors when the run ends)."""

    def __init__(self, pids: dict[str, int], metrics: Path, poll: float):
        super().__init__(daemon=True)
        self.pids, self.metrics, self.poll = pids, metrics, poll
        self.rows: list[dict] = []
        self.peaks: dict[str, float] = {}
        self.stop = threading.Event()
        self.start_time = time.time()
        self.state = cluster_state()

    def record(self, epoch: int) -> None:
        row: dict[str, float | None] = {"epoch": epoch}
        row["seconds"] = round(time.time() - self.start_time, 2)
        row |= {name: proc_mb(pid, "VmRSS") for name, pid in self.pids.items()}
        self.rows.append(row | {"object_store": object_store_mb(self.state)})

    def run(self) -> None:
        self.record(0)
        while not self.stop.wait(self.poll):
            for name, pid in self.pids.items():
                if (peak := proc_mb(pid, "VmHWM")) is not None:
                    self.peaks[name] = peak
            done = len(self.metrics.read_text().splitlines()) if self.metrics.exists() else 0
            if done > self.rows[-1]["epoch"]:
                self.record(done)


def slope(rows: list[dict], key: str, first: int = 1) -> float | None:
    """Least-squares MB per epoch of `key` over the epochs from `first` on (None if < 2)."""
    points = [(r["epoch"], r[key]) for r in rows if r["epoch"] >= first and r[key] is not None]
    if len(points) < 2:
        return None
    x, y = np.array(points, dtype=float).T
    return float(np.polyfit(x, y, 1)[0])


def main(args: Args) -> None:
    import ray

    facts = machine()
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
            sample = config.sample
            if args.num_steps:
                sample = dataclasses.replace(sample, num_steps=args.num_steps)
            config = override(
                config,
                {
                    "run": {"epochs": args.epochs, "dir": Path(tmp)},
                    "system.mode": args.mode,
                    "sample": sample,
                },
            )
            driver = Driver(config)

            def pid(actor) -> int:
                return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))

            pids = {"driver": os.getpid(), "learner": pid(driver.learner)}
            pids |= {f"sampler {i}": pid(s) for i, s in enumerate(driver.samplers)}
            for name, pool in driver.pools.items():
                pids |= {f"reward {name} {i}": pid(a) for i, a in enumerate(pool.actors)}
            monitor = Monitor(pids, Path(tmp) / "metrics.jsonl", args.poll)
            monitor.start()
            history = driver.run()
            monitor.stop.set()
            monitor.join()
            peaks = monitor.peaks | {"driver": proc_mb(os.getpid(), "VmHWM")}
    finally:
        ray.shutdown()

    rows = monitor.rows
    table, processes = [], {}
    for name in [*pids, "object_store"]:
        values = [r[name] for r in rows if r[name] is not None]
        processes[name] = {
            "pid": pids.get(name),
            "peak_mb": peaks.get(name, max(values, default=None)),
            "end_mb": values[-1] if values else None,
            "slope_mb_per_epoch": slope(rows, name),
            # Allocators and caches warm up; a leak keeps its slope in the second half too.
            "slope_mb_per_epoch_second_half": slope(rows, name, first=len(history) // 2),
        }
        p = processes[name]
        table.append(
            [
                name,
                p["pid"],
                p["peak_mb"],
                p["end_mb"],
                p["slope_mb_per_epoch"],
                p["slope_mb_per_epoch_second_half"],
            ]
        )
    seconds = np.mean([h["seconds"] for h in history[1:]] or [history[0]["seconds"]])
    print(f"\n{describe(facts)}")
    steps = config.sample.num_steps
    print(
        f"tiny compressibility, {args.mode}, {steps} steps, {len(history)} epochs of "
        f"{seconds:.1f} s\n"
    )
    header = [
        "process",
        "pid",
        "peak MB",
        "MB after last epoch",
        "slope MB/epoch (from 1)",
        "slope (2nd half)",
    ]
    print(markdown_table(header, table))
    print("\nPeak: VmHWM. The object store is read at each epoch's end (its peak is the largest).")
    out = args.out or Path(f"bench/results/memory_{args.mode}.json")
    write_json(
        out,
        {
            "machine": facts,
            "args": dataclasses.asdict(args),
            "epoch_seconds_mean": float(seconds),
            "processes": processes,
            "series": rows,
        },
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
