"""Does a task preset learn? Paired evaluations over seeds, each against a shuffled control.

    python bench/learning.py --task compressibility --seeds 0 1 2 3 4
    python bench/learning.py --task compressibility --seeds 0 1 --epochs 20 \
        --set train.learning_rate=3e-3 sample.num_steps=10 --no-plot --out /tmp/lr3e-3.json

Per seed it runs the preset twice, in one process through the driver's own code path:
- the run itself;
- a shuffled-advantage control: the same run with every epoch's advantages permuted across its
  samples, so the weights move as much with no signal in the direction (drift is not neutral on
  the JPEG rewards, so an lr 0 control would prove nothing).

From each run's evaluations (the same fixed prompts and seeds scored under the start, every
--eval-every, and the final weights) it reports the paired mean gain, its t statistic and the
curve. JSON goes to --out, the curves to a PNG beside it. For a JPEG task the gain is also given
as a fraction of the room there is to move: from the start evaluation to the JPEG size of a flat
image at the model's resolution.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tyro

from ddpo.config import Config, override
from ddpo.presets import task_config
from learner.driver import Driver
from learner.evaluation import paired_gain, read_evals
from learner.shuffled import ShuffledDriver
from learner.wiring import InProcess


@dataclass(frozen=True)
class Args:
    task: str = "compressibility"
    model: str = "tiny"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int | None = None
    """Default: the preset's."""
    eval_every: int = 5
    set: tuple[str, ...] = ()
    """Config overrides, dotted KEY=VALUE (JSON values): train.learning_rate=3e-3 system.mode=async."""
    control: bool = True
    """Also run the shuffled-advantage control of each seed."""
    plot: bool = True
    out: Path = Path("bench/results/learning.json")
    keep_runs: Path | None = None
    """Keep the run directories here (default: temporary)."""
    from_runs: Path | None = None
    """Run nothing: summarise the run directories kept in this folder by --keep-runs."""


def apply_overrides(config: Config, items: tuple[str, ...]) -> Config:
    """KEY=VALUE with dotted keys (`ddpo.config.override`); values parsed as JSON."""
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: write KEY=VALUE, e.g. train.learning_rate=3e-3")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        changes[key] = tuple(value) if isinstance(value, list) else value
    try:
        return override(config, changes)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"--set {' '.join(items)}: {err}") from None


def flat_reward(config: Config) -> float | None:
    """The reward of a flat grey image at the model's resolution (JPEG tasks only)."""
    if not config.reward.startswith("jpeg_"):
        return None
    from ddpo.policy import load_pipeline
    from rewards import make_reward

    pipe = load_pipeline(config.model)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    flat = np.full((1, size, size, 3), 128, np.uint8)
    return float(make_reward(config.reward)(flat, ["flat"])[0][0])


def one_run(config: Config, shuffled: bool, reuse: bool = False) -> dict:
    """Run (or, with `reuse`, read back) one run; its evaluations with their paired gains."""
    start = time.time()
    if not reuse:
        (ShuffledDriver if shuffled else Driver)(config, InProcess()).run()
    evals = read_evals(Path(str(config.run.dir)))
    for e in evals:
        e["epoch"] = (
            0 if e["when"] == "start" else config.run.epochs if e["when"] == "end" else e["when"]
        )
    return {
        "start": evals[0]["reward_mean"],
        "end": evals[-1]["reward_mean"],
        "gain": paired_gain(evals[0]["rewards"], evals[-1]["rewards"]),
        "curve": [[e["epoch"], e["reward_mean"]] for e in evals],
        "evals": [
            {"epoch": e["epoch"], "rewards": e["rewards"], "kl_base": e.get("kl_base")}
            | ({"heldout": e["heldout"]["rewards"]} if "heldout" in e else {})
            for e in evals
        ],
        "seconds": None if reuse else round(time.time() - start, 1),
    }


def study_config(
    task: str, model: str, overrides: tuple[str, ...], epochs: int | None, eval_every: int
) -> Config:
    """What every run of a study shares: the task's preset with `--set` overrides, `epochs`
    long (None: the preset's), evaluated every `eval_every` epochs, with no checkpoints."""
    config = apply_overrides(task_config(task, model), overrides)
    epochs = epochs if epochs is not None else config.run.epochs
    return override(config, {"run": {"epochs": epochs, "eval_every": eval_every, "save_every": 0}})


def main(args: Args) -> None:
    config = study_config(args.task, args.model, args.set, args.epochs, args.eval_every)
    flat = flat_reward(config)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.from_runs or args.keep_runs or Path(tmp)
        for seed in args.seeds:
            row: dict[str, Any] = {"seed": seed}
            for name in ("run", "control") if args.control else ("run",):
                run_dir = root / f"{args.task}-s{seed}-{name}"
                run_config = override(config, {"seed": seed, "run.dir": run_dir})
                row[name] = one_run(
                    run_config, shuffled=name == "control", reuse=args.from_runs is not None
                )
                g = row[name]["gain"]
                print(
                    f"seed {seed} {name:7s}: eval {row[name]['start']:+.4f} -> "
                    f"{row[name]['end']:+.4f}  gain {g['mean']:+.4f} (t {g['t']:+.1f})  "
                    f"{row[name]['seconds'] or 0:.0f}s",
                    flush=True,
                )
            results.append(row)
    summary = summarize(results, flat)
    print(json.dumps(summary, indent=2))
    out = {
        "task": args.task,
        "overrides": list(args.set),
        "config": dataclasses.asdict(config),
        "seeds": results,
        "summary": summary,
        "flat_image_reward": flat,
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "date": time.strftime("%Y-%m-%d"),
        "commit": _commit(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")
    if args.plot:
        plot(results, args.out.with_suffix(".png"), f"{args.task}: {' '.join(args.set)}")


def summarize(results: list[dict], flat: float | None) -> dict:
    """Across seeds, at the end and at every evaluation: the paired gains, their smallest t, the
    controls' gains, and the margin of each run over its control on the same samples."""
    room = None
    if flat is not None:
        room = float(np.mean([flat - r["run"]["start"] for r in results]))
    by_epoch = {}
    for i, e in enumerate(results[0]["run"]["evals"][1:], start=1):
        gains, controls, margins = [], [], []
        for r in results:
            start, now = r["run"]["evals"][0]["rewards"], r["run"]["evals"][i]["rewards"]
            gains.append(paired_gain(start, now))
            if "control" in r and i < len(r["control"]["evals"]):
                control = r["control"]["evals"][i]["rewards"]
                controls.append(paired_gain(start, control))
                margins.append(paired_gain(control, now))
        row: dict[str, Any] = {
            "gain_mean": float(np.mean([g["mean"] for g in gains])),
            "gain_min": float(min(g["mean"] for g in gains)),
            "t_min": float(min(g["t"] for g in gains)),
            "gains": [round(g["mean"], 4) for g in gains],
            "t": [round(g["t"], 2) for g in gains],
        }
        if "heldout" in e:  # the same weights on prompts never trained on
            heldout = [
                paired_gain(r["run"]["evals"][0]["heldout"], r["run"]["evals"][i]["heldout"])
                for r in results
            ]
            row["heldout_gain_mean"] = float(np.mean([h["mean"] for h in heldout]))
            row["heldout_gains"] = [round(h["mean"], 4) for h in heldout]
            row["heldout_t"] = [round(h["t"], 2) for h in heldout]
        if e.get("kl_base") is not None:
            row["kl_base"] = [r["run"]["evals"][i]["kl_base"] for r in results]
        if controls:
            row["control_gain_mean"] = float(np.mean([c["mean"] for c in controls]))
            row["control_gains"] = [round(c["mean"], 4) for c in controls]
            row["margins"] = [round(m["mean"], 4) for m in margins]
            row["margin_t"] = [round(m["t"], 2) for m in margins]
        if room:
            row["fraction_of_room"] = row["gain_mean"] / room
        by_epoch[e["epoch"]] = row
    end = by_epoch[max(by_epoch)]
    return {"room": room, "end": end, "by_epoch": by_epoch}


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, row in enumerate(results):
        colour = f"C{i}"
        run = np.array(row["run"]["curve"])
        ax.plot(run[:, 0], run[:, 1], color=colour, label=f"seed {row['seed']}")
        if "control" in row:
            ctrl = np.array(row["control"]["curve"])
            ax.plot(ctrl[:, 0], ctrl[:, 1], color=colour, linestyle="--", alpha=0.7)
    ax.set_xlabel("epoch")
    ax.set_ylabel("evaluation reward (fixed samples)")
    import textwrap

    heading = textwrap.fill(title, 90) + "\nsolid: DDPO-IS, dashed: shuffled-advantage control"
    ax.set_title(heading, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main(tyro.cli(Args))
