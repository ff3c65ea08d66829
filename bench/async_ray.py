"""Async through Ray against sync, paired, over seeds: the CLI's own runs, one at a time.

    python bench/async_ray.py --seeds 0 1 2 3 4 --runs runs/async_ray
    python bench/async_ray.py --seeds 0 1 2 3 4 --runs runs/async_ray --no-run   # summarise only
    python bench/async_ray.py --mode sync --runs runs/sync_ray --out bench/results/x.json

Each seed runs `python -m learner.run --task TASK --model tiny --seed S --mode async
--num-samplers 2 --max-staleness 1 --eval-every N --run-dir RUNS/TASK-sS-run` (plus --flags) in
a subprocess, on its own local Ray instance, as a user would (`--mode sync`: the plain sync
run, one sampler); a run whose directory already holds an end evaluation is not run again.
From each run's eval.jsonl it takes the paired gain of every evaluation over the start (the
same fixed prompts and noise), and from metrics.jsonl how stale the trained batches were and
what happened to every sampled batch. The sync reference (--sync) is either a study's per-run
results (`bench/sweep.py`'s OUT.jobs.jsonl, runs named --sync-name) or a folder of sync run
directories that this script wrote with --mode sync, evaluated on the same fixed samples:
the gain over sync's at equal trained samples, per seed and on average, is the issue's "async
reaches 90% of sync" figure. Writes --out (JSON) and prints a markdown table.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tyro
from common import describe, machine, markdown_table, write_json
from sweep import read_jobs

from learner.evaluation import paired_gain, read_evals
from learner.report import METRICS_FILE, read_metrics


@dataclass(frozen=True)
class Args:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    task: str = "compressibility"
    runs: Path = Path("runs/async_ray")
    """Where the run directories live (kept: --no-run summarises them again)."""
    run: bool = True
    """Run the seeds whose directories hold no finished run; --no-run only summarises."""
    mode: Literal["async", "sync"] = "async"
    eval_every: int = 20
    flags: tuple[str, ...] = ()
    """More learner.run flags for every run, each entry split as a shell would split it:
    --flags=--train.decoupled, or --flags='--train.decoupled --train.target-kl 0.03'."""
    sync: Path = Path("bench/results/sweep_cpu_11.jobs.jsonl")
    """The sync reference: a study's per-run results (bench/sweep.py's OUT.jobs.jsonl), or a
    folder of run directories written with --mode sync."""
    sync_name: str = "every linear and convolution, lr 3e-3, 80 epochs"
    """The name of the sync runs in --sync."""
    out: Path = Path("bench/results/learning_async_ray_every_layer.json")


def command(args: Args, seed: int, run_dir: Path) -> list[str]:
    mode = ["--mode", "async", "--num-samplers", "2", "--max-staleness", "1"]
    return [
        sys.executable, "-m", "learner.run", "--task", args.task, "--model", "tiny",
        "--seed", str(seed), *(mode if args.mode == "async" else []),
        "--eval-every", str(args.eval_every), "--run-dir", str(run_dir),
        *(word for flag in args.flags for word in shlex.split(flag)),
    ]  # fmt: skip


def finished(run_dir: Path) -> bool:
    return (run_dir / "eval.jsonl").is_file() and read_evals(run_dir)[-1]["when"] == "end"


def gains_by_epoch(evals: list[dict]) -> dict[int, float]:
    """Evaluation records (eval.jsonl's, with per-sample rewards and the number of updates
    made, or a study's, with `epoch`) -> epoch -> paired mean gain over the first."""
    start = evals[0]["rewards"]
    epoch = "epoch" if "epoch" in evals[0] else "policy_version"
    return {e[epoch]: paired_gain(start, e["rewards"])["mean"] for e in evals[1:]}


def study_gains(path: Path, name: str) -> dict[int, dict[int, float]]:
    """seed -> epoch -> paired mean gain of the runs named `name` in a bench/sweep.py jobs file."""
    return {
        int(seed): gains_by_epoch(result["evals"])
        for (kind, job_name, seed), result in read_jobs(path).items()
        if kind == "run" and job_name == name
    }


def sync_gains(path: Path, name: str, task: str) -> dict[int, dict[int, float]]:
    """seed -> epoch -> the sync run's paired mean gain at that epoch's evaluation."""
    if path.is_dir():  # run directories written with --mode sync
        gains = {
            int(run.name.removeprefix(f"{task}-s").removesuffix("-run")): gains_by_epoch(
                read_evals(run)
            )
            for run in path.glob(f"{task}-s*-run")
            if finished(run)
        }
        if not gains:
            raise SystemExit(f"--sync {path} holds no finished {task}-sS-run directories")
        return gains
    gains = study_gains(path, name)
    if not gains:
        raise SystemExit(f"--sync {path} holds no runs named {name!r}; see --sync-name")
    return gains


def accounting(run_dir: Path) -> dict[str, Any]:
    """From metrics.jsonl: staleness of the trained batches, the batch totals, time and load."""
    rows = read_metrics(run_dir / METRICS_FILE)
    hist: dict[str, int] = {}
    for row in rows:
        for key, count in row.items():
            if key.startswith("staleness/hist/"):
                k = key.rsplit("/", 1)[1]
                hist[k] = hist.get(k, 0) + int(count)
    last = rows[-1]
    return {
        "updates": len(rows),
        "staleness_hist": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
        "batches_sampled": last.get("total/batches_sampled"),
        "batches_dropped_stale": last.get("total/batches_dropped_stale"),
        "batches_trained": last.get("total/batches_trained"),
        "run_wall_seconds": last.get("wall_seconds"),
        "busy_learner": last.get("busy/learner"),
        "busy_sampler": last.get("busy/sampler"),
        # After the first updates (where clipping starts from zero), a spike here marks an
        # update that moved the policy far on the samples it trained (decoupled PPO's instability).
        "approx_kl_max_after_5": max((r["approx_kl"] for r in rows[5:]), default=None),
    }


def summarise(run_dir: Path, sync: dict[int, float]) -> dict[str, Any]:
    evals = read_evals(run_dir)
    start = evals[0]
    rows = []
    for e in evals[1:]:
        epoch = e["policy_version"]  # updates of 64 trained samples: sync's epochs
        gain = paired_gain(start["rewards"], e["rewards"])
        row = {"epoch": epoch, "gain": gain}
        if "heldout" in e:
            row["heldout_gain"] = paired_gain(start["heldout"]["rewards"], e["heldout"]["rewards"])
        if epoch in sync:
            row["sync_gain"] = sync[epoch]
            row["async_over_sync"] = gain["mean"] / sync[epoch]
        rows.append(row)
    return {"evals": rows, **accounting(run_dir)}


def main(args: Args) -> None:
    sync = sync_gains(args.sync, args.sync_name, args.task)
    results = []
    for seed in args.seeds:
        run_dir = args.runs / f"{args.task}-s{seed}-run"
        seconds = None
        if args.run and not finished(run_dir):
            start = time.perf_counter()
            cmd = command(args, seed, run_dir)
            print(" ".join(cmd), flush=True)
            log = run_dir.with_suffix(".log")
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            with log.open("w") as out:
                if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode:
                    raise SystemExit(f"seed {seed}: learner.run failed; its output is in {log}")
            seconds = round(time.perf_counter() - start, 1)
        if not finished(run_dir):
            raise SystemExit(f"{run_dir} holds no finished run; run without --no-run")
        if seed not in sync:
            raise SystemExit(f"--sync {args.sync} has no run of seed {seed}")
        results.append({"seed": seed, "seconds": seconds} | summarise(run_dir, sync[seed]))

    epochs = [row["epoch"] for row in results[0]["evals"]]
    table = []
    for r in results:
        by_epoch = {row["epoch"]: row for row in r["evals"]}
        end = r["evals"][-1]
        table.append(
            [r["seed"], end.get("sync_gain")]
            + [by_epoch[e]["gain"]["mean"] for e in epochs]
            + [end["gain"]["t"], end.get("async_over_sync"), end["heldout_gain"]["mean"]
               if "heldout_gain" in end else None, r["staleness_hist"], r["approx_kl_max_after_5"],
               r["run_wall_seconds"]]
        )  # fmt: skip
    ratios = [r["evals"][-1].get("async_over_sync") for r in results]
    sync_end = [r["evals"][-1].get("sync_gain") for r in results]
    async_end = [r["evals"][-1]["gain"]["mean"] for r in results]
    summary = {
        "sync_gain_mean": float(np.mean(sync_end)) if None not in sync_end else None,
        "async_gain_mean": float(np.mean(async_end)),
        "async_over_sync_of_means": (
            float(np.mean(async_end) / np.mean(sync_end)) if None not in sync_end else None
        ),
        "async_over_sync_per_seed": ratios,
        "t_min": min(r["evals"][-1]["gain"]["t"] for r in results),
        "every_seed_gains": all(r["evals"][-1]["gain"]["mean"] > 0 for r in results),
    }
    facts = machine()
    print(describe(facts))
    header = ["seed", "sync gain"] + [f"async at {e}" for e in epochs]
    header += ["t", "async / sync", "held-out", "staleness", "largest approx_kl", "run s"]
    print(markdown_table(header, table))
    print(json.dumps(summary, indent=2))
    write_json(
        args.out,
        {
            "command": " ".join(command(args, 0, args.runs / "DIR")).replace(
                "--seed 0", "--seed S"
            ),
            "sync": str(args.sync),
            "sync_name": args.sync_name,
            "machine": facts,
            "summary": summary,
            "seeds": results,
        },
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
