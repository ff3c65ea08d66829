"""Many settings of one task over several seeds, in parallel processes: a screen for presets.

    python bench/sweep.py bench/sweeps/tiny_compressibility.json --jobs 12 --device cuda \
        --out bench/results/sweep.json

The sweep file maps a name to a list of `bench/learning.py --set` overrides:

    {"preset": [], "lr 3e-2": ["train.learning_rate=3e-2"]}

Every (setting, seed) run goes first; with --control, the shuffled-advantage controls follow in
the same order, so a sweep cut short by --budget-s still has every run it finished. Each job runs
`bench/learning.py`'s own `one_run` in a fresh process; the summary per setting is
`bench/learning.py`'s, so a sweep row reads like a study. Runs on a GPU are not bit-equal to
runs on a CPU: a sweep picks settings, the study on the target machine confirms them.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning import flat_reward, one_run, study_config, summarize  # noqa: E402

from ddpo.config import override  # noqa: E402


@dataclass(frozen=True)
class Args:
    sweep: tyro.conf.Positional[Path]
    """JSON: {name: [KEY=VALUE, ...]}."""
    task: str = "compressibility"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int | None = None
    eval_every: int = 10
    device: str = "cpu"
    jobs: int = 2
    threads: int = 1
    """Torch threads in each job."""
    control: bool = True
    budget_s: float | None = None
    """Stop starting jobs after this many seconds; the finished ones are summarised."""
    out: Path = Path("bench/results/sweep.json")
    """The summary; every finished job is also appended to OUT.jobs.jsonl as it ends, so a
    sweep killed from outside keeps them (summarise them with --from-jobs)."""
    from_jobs: Path | None = None
    """Run nothing: summarise this .jobs.jsonl."""
    resume: bool = False
    """Keep the jobs OUT.jobs.jsonl already holds (a sweep killed or cut short) and run only
    the others, appending to it."""


def build(args: Args, items: list[str], seed: int, run_dir: Path) -> Any:
    overrides = (*items, f"system.device={args.device}")
    config = study_config(args.task, "tiny", overrides, args.epochs, args.eval_every)
    return override(config, {"seed": seed, "run.dir": run_dir})


def job(
    args: Args, items: list[str], seed: int, shuffled: bool, run_dir: Path, sweep_pid: int
) -> dict:
    import torch

    exit_with(sweep_pid)
    torch.set_num_threads(args.threads)
    return one_run(build(args, items, seed, run_dir), shuffled)


def exit_with(sweep_pid: int) -> None:
    """End this worker within seconds of the sweep's own end. A sweep killed from outside
    (SIGTERM, SIGKILL) runs no cleanup, and its pool's workers would go on with their jobs,
    taking the cores from whatever runs next."""

    def watch() -> None:
        while os.getppid() == sweep_pid:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-sweep").start()


def main(args: Args) -> None:
    sweep: dict[str, list[str]] = json.loads(args.sweep.read_text())
    for items in sweep.values():  # fail on a bad override before anything runs
        build(args, items, 0, Path("unused"))
    start = time.time()
    if args.from_jobs:
        results = read_jobs(args.from_jobs)
    else:
        results = run_jobs(args, sweep)
    write_summary(args, sweep, results, time.time() - start)


def read_jobs(path: Path) -> dict[tuple[str, str, int], dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["kind"], r["name"], r["seed"]): r["result"] for r in rows}


def run_jobs(args: Args, sweep: dict[str, list[str]]) -> dict[tuple[str, str, int], dict]:
    kinds = ("run", "control") if args.control else ("run",)
    queue = [(k, n, s) for k in kinds for n in sweep for s in args.seeds]
    jobs_file = args.out.with_suffix(".jobs.jsonl")
    results: dict[tuple[str, str, int], dict] = {}
    if args.resume and jobs_file.exists():
        results = {k: r for k, r in read_jobs(jobs_file).items() if k in queue}
        queue = [key for key in queue if key not in results]
        print(f"resuming: {len(results)} jobs done, {len(queue)} to run", flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    start = time.time()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with (
        jobs_file.open("a" if args.resume else "w") as log,
        tempfile.TemporaryDirectory() as tmp,
        ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool,
    ):
        pending: dict[Any, tuple[str, str, int]] = {}
        while queue or pending:
            late = args.budget_s is not None and time.time() - start > args.budget_s
            while queue and len(pending) < args.jobs and not late:
                kind, name, seed = key = queue.pop(0)
                run_dir = Path(tmp) / f"{len(results) + len(pending)}"
                future = pool.submit(
                    job, args, sweep[name], seed, kind == "control", run_dir, os.getpid()
                )
                pending[future] = key
            if late:
                queue.clear()
            if not pending:
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                key = pending.pop(future)
                try:
                    results[key] = future.result()
                except Exception as err:  # one failed setting must not lose the others
                    print(f"{key}: FAILED {type(err).__name__}: {err}", flush=True)
                    continue
                record = {"kind": key[0], "name": key[1], "seed": key[2], "result": results[key]}
                log.write(json.dumps(record) + "\n")
                log.flush()
                g = results[key]["gain"]
                print(
                    f"[{time.time() - start:5.0f}s] {key[1]} seed {key[2]} {key[0]}: "
                    f"gain {g['mean']:+.4f} (t {g['t']:+.1f}) {results[key]['seconds']:.0f}s",
                    flush=True,
                )
    return results


def write_summary(
    args: Args,
    sweep: dict[str, list[str]],
    results: dict[tuple[str, str, int], dict],
    seconds: float,
) -> None:
    flat = flat_reward(build(args, [], 0, Path("unused")))
    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "settings": {}}
    for name, items in sweep.items():
        rows = []
        for seed in args.seeds:
            if ("run", name, seed) not in results:
                continue
            row = {"seed": seed, "run": results[("run", name, seed)]}
            if ("control", name, seed) in results:
                row["control"] = results[("control", name, seed)]
            rows.append(row)
        if not rows:
            continue
        summary = summarize(rows, flat)
        out["settings"][name] = {"overrides": items, "summary": summary, "seeds": rows}
        end = summary["end"]
        print(
            f"{name:40s} gains {end['gains']} t {end['t']} room "
            f"{end.get('fraction_of_room', float('nan')):.3f} controls {end.get('control_gains')}",
            flush=True,
        )
    out["seconds"] = round(seconds, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main(tyro.cli(Args))
