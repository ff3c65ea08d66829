"""Seconds per epoch of the demo when other processes keep cores busy, for each thread setting.

    python bench/contention.py                      # the table in BENCHMARKS.md
    python bench/contention.py --loads 0 1 --settings governor --modes in-process

Each cell runs `python -m learner.run --task compressibility --model tiny --epochs N` (through
Ray, or with --in-process) in a fresh process with the setting's environment, while `load`
processes spin (`while True: pass`), and reports the mean `seconds` of metrics.jsonl over the
epochs after the first. A cell that has not finished within --cell-timeout seconds is stopped
and reported from the epochs it finished (or as at least the time it ran, if none).

Settings:
- fixed-2: two torch threads per process, OpenMP's default waiting (spin, then sleep): the
  project before the thread governor;
- passive: two threads, OMP_WAIT_POLICY=PASSIVE (threads sleep at once at a barrier);
- fixed-1: one thread per process;
- governor: the default now: each step's thread count chosen from measured step times
  (ddpo.threads).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

SETTINGS = {
    "fixed-2": {"DDPO_THREADS": "2"},
    "passive": {"DDPO_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "fixed-1": {"DDPO_THREADS": "1"},
    "governor": {},
}


@dataclass(frozen=True)
class Args:
    settings: tuple[str, ...] = ("fixed-2", "passive", "fixed-1", "governor")
    loads: tuple[int, ...] = (0, 1, 2)
    modes: tuple[str, ...] = ("in-process", "ray")
    epochs: int = 3
    cell_timeout: float = 150.0
    """Seconds a cell may run before it is stopped (the default setting under load is slow)."""
    skip: tuple[str, ...] = ("passive/ray", "fixed-1/ray", "passive/2", "fixed-1/2", "fixed-2/2")
    """Cells left out, as SETTING/MODE or SETTING/LOAD, to keep the benchmark short."""
    out: Path = Path("bench/results/contention.json")


def run_cell(setting: str, load: int, mode: str, args: Args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DDPO_THREADS", "OMP_WAIT_POLICY")}
    env |= SETTINGS[setting]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "learner.run", "--task", "compressibility", "--model", "tiny"]
        cmd += ["--epochs", str(args.epochs), "--run-dir", str(run_dir), "--save-every", "0"]
        if mode == "in-process":
            cmd.append("--in-process")
        start = time.time()
        try:
            subprocess.run(cmd, env=env, timeout=args.cell_timeout, check=True, capture_output=True)
            finished = True
        except subprocess.TimeoutExpired:
            finished = False
        finally:
            for p in busy:
                p.kill()
            for p in busy:
                p.wait()
        wall = time.time() - start
        metrics = run_dir / "metrics.jsonl"
        records = (
            [json.loads(s) for s in metrics.read_text().splitlines()] if metrics.exists() else []
        )
    if records:  # epochs after the first; the first alone if the cell ran out of time
        seconds = [r["seconds"] for r in records[1:]] or [r["seconds"] for r in records]
        return {
            "seconds": float(np.mean(seconds)),
            "update": float(np.mean([r["seconds/update"] for r in records[1:] or records])),
            "sample_score": float(
                np.mean([r["seconds/sample_score"] for r in records[1:] or records])
            ),
            "epochs": len(records),
            "finished": finished,
            "lower_bound": False,
        }
    # Not even the first epochs finished: the time it ran is a lower bound on one epoch.
    return {"seconds": wall, "epochs": len(records), "finished": False, "lower_bound": True}


def main(args: Args) -> None:
    cells = {}
    for mode in args.modes:
        for setting in args.settings:
            for load in args.loads:
                if f"{setting}/{mode}" in args.skip or f"{setting}/{load}" in args.skip:
                    continue
                cell = run_cell(setting, load, mode, args)
                cells[f"{mode}/{setting}/{load}"] = cell
                mark = ">=" if cell["lower_bound"] else ""
                print(
                    f"{mode:10s} {setting:9s} load {load}: {mark}{cell['seconds']:.2f} s/epoch",
                    flush=True,
                )
    table = [
        "| mode | setting | "
        + " | ".join(f"{n} busy" for n in args.loads)
        + " | ratio 1 busy / quiet |"
    ]
    table.append("| --- " * (3 + len(args.loads)) + "|")
    for mode in args.modes:
        for setting in args.settings:
            row = [cells.get(f"{mode}/{setting}/{n}") for n in args.loads]
            if not any(row):
                continue
            text = [
                "" if c is None else (">=" if c["lower_bound"] else "") + f"{c['seconds']:.2f}"
                for c in row
            ]
            quiet, one = cells.get(f"{mode}/{setting}/0"), cells.get(f"{mode}/{setting}/1")
            ratio = f"{one['seconds'] / quiet['seconds']:.2f}" if quiet and one else ""
            table.append(f"| {mode} | {setting} | " + " | ".join(text) + f" | {ratio} |")
    print("\n".join(table))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "cells": cells,
                "table": table,
                "epochs": args.epochs,
                "machine": f"{os.cpu_count()} cores, {platform.machine()}",
                "date": time.strftime("%Y-%m-%d"),
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
