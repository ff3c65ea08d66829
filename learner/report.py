"""The run report: a reward-curve plot, one HTML page, and optional TensorBoard logs.

    python -m learner.report RUN_DIR          # (re)write RUN_DIR/reward_curve.png and index.html

`write_report(run_dir)` reads `metrics.jsonl`, `eval.jsonl` and the image grids (`grid_start.png`,
`grid_epoch0010.png`, ..., `grid_end.png`, see `grid_name`) that the driver wrote and makes
`reward_curve.png`, `start_end.png`, `signals.png` and `index.html` beside them; the page shows
the curve, the evaluations (the fixed prompts x seeds at start, every `--eval-every` and end,
each with its paired gain over the start, on training and held-out prompts, with the KL to the
base model and the guard reward), the start and end grids side by side, every grid in training order
and a table of every epoch's metrics. `TensorBoardWriter` logs the same scalars and grids when
`--tensorboard` is set (needs `pip install tensorboard`).
"""

from __future__ import annotations

import html
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from learner.evaluation import EVAL_KEYS, GUARD_KEYS, HELDOUT_KEYS, eval_rows, plot_signals

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
CURVE_FILE = "reward_curve.png"
START_END_FILE = "start_end.png"
SIGNALS_FILE = "signals.png"
INDEX_FILE = "index.html"
TABLE_KEYS = ("epoch", "policy_version", "reward_mean", "reward_std", "loss", "approx_kl")
"""Columns shown first in the HTML table; every other key of the records follows."""


def grid_name(epoch: int | str) -> str:
    """File name of an image grid: `grid_start.png`, `grid_epoch0010.png`, `grid_end.png`."""
    return f"grid_{epoch}.png" if isinstance(epoch, str) else f"grid_epoch{epoch:04d}.png"


def grid_files(run_dir: Path) -> list[Path]:
    """The run's image grids in training order: start, by epoch, end, then any others by name."""

    def order(path: Path) -> tuple[int, int, str]:
        stem = path.stem.removeprefix("grid_")
        if stem == "start":
            return (0, 0, stem)
        if m := re.fullmatch(r"epoch(\d+)", stem):
            return (1, int(m[1]), stem)
        return (2, 0, stem) if stem == "end" else (3, 0, stem)

    return sorted(Path(run_dir).glob("grid_*.png"), key=order)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line that is not a JSON object is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; point at a run directory written by `python -m learner.run`"
        )
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number} is not JSON ({err}): {line[:80]!r}") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number} is not a JSON object: {line[:80]!r}")
        records.append(record)
    return records


def reward_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """First, last and best mean reward, epochs, samples and seconds of a run's records."""
    rewards = [(r.get("epoch", i), r["reward_mean"]) for i, r in enumerate(records)]
    rewards = [(e, v) for e, v in rewards if isinstance(v, int | float) and math.isfinite(v)]
    if not rewards:
        return {"epochs": len(records)}
    best_epoch, best = max(rewards, key=lambda ev: ev[1])
    return {
        "epochs": len(records),
        "first_reward": rewards[0][1],
        "last_reward": rewards[-1][1],
        "best_reward": best,
        "best_epoch": best_epoch,
        "samples": sum(r.get("samples") or 0 for r in records),
        "seconds": round(sum(r.get("seconds") or 0.0 for r in records), 1),
    }


def plot_reward_curve(records: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Mean reward per epoch with a +-1 std band, plus one line per reward term
    (`reward/<name>/mean`) on a second axis when the reward is a weighted sum."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    epochs = [r.get("epoch", i) for i, r in enumerate(records)]
    mean = [_number(r.get("reward_mean")) for r in records]
    std = [_number(r.get("reward_std"), 0.0) for r in records]
    terms = sorted(
        {m[1] for r in records for k in r if (m := re.fullmatch(r"reward/(.+)/mean", k))}
    )
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(epochs, mean, marker="o", markersize=3, label="reward (mean over the epoch)")
    ax.fill_between(
        epochs,
        [m - s for m, s in zip(mean, std, strict=True)],
        [m + s for m, s in zip(mean, std, strict=True)],
        alpha=0.2,
        label="± 1 std",
    )
    if terms and terms != ["total"]:
        twin = ax.twinx()
        for i, name in enumerate(terms):  # colours C1, C2, ...: C0 is the total
            values = [_number(r.get(f"reward/{name}/mean")) for r in records]
            twin.plot(epochs, values, linestyle="--", color=f"C{i + 1}", label=name)
        twin.set_ylabel("reward term (mean)")
        twin.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("reward")
    ax.set_title(title or "reward per epoch")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _number(value: Any, default: float = math.nan) -> float:
    return float(value) if isinstance(value, int | float) else default


def start_end_figure(run_dir: Path, rows: list[dict[str, Any]]) -> Path | None:
    """`start_end.png`: grid_start.png and grid_end.png side by side, each titled with its
    evaluation (policy version, mean reward; the end with its paired gain). None without both."""
    from PIL import Image, ImageDraw, ImageFont

    from ddpo.images import fit_text

    paths = [run_dir / grid_name("start"), run_dir / grid_name("end")]
    if not all(p.is_file() for p in paths):
        return None
    grids = [Image.open(p).convert("RGB") for p in paths]
    by_when = {str(r["when"]): r for r in rows}
    font = ImageFont.load_default(size=max(12, grids[0].height // 40))
    line, gap = int(font.getbbox("Ag")[3]) + 8, 16
    figure = Image.new(
        "RGB",
        (sum(g.width for g in grids) + gap, max(g.height for g in grids) + line),
        "white",
    )
    draw, x = ImageDraw.Draw(figure), 0
    for when, grid in zip(("start", "end"), grids, strict=True):
        title = fit_text(_eval_title(when, by_when.get(when)), font, grid.width - 8)
        draw.text((x + 4, 4), title, fill="black", font=font)
        figure.paste(grid, (x, line))
        x += grid.width + gap
    path = run_dir / START_END_FILE
    figure.save(path)
    return path


def _eval_title(when: str, row: dict[str, Any] | None) -> str:
    if not row:
        return when
    title = f"{when}: v{row.get('policy_version')}, reward {_fmt(row.get('reward_mean'))}"
    if "gain" in row:
        title += f", paired gain {row['gain']:+.3g} ± {row['gain_se']:.2g} (t {row['t']:+.1f})"
    return title


def write_report(run_dir: Path) -> Path:
    """Write `reward_curve.png` (when there are metrics), `start_end.png` (when there are both
    grids) and `index.html` into run_dir."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    metrics, evals = run_dir / METRICS_FILE, run_dir / EVAL_FILE
    records = read_metrics(metrics) if metrics.is_file() else []
    rows = eval_rows(read_metrics(evals)) if evals.is_file() else []
    config = _read_config(run_dir)
    title = f"{config.get('task', run_dir.name)} on {config.get('model', '?')}"
    if records:
        plot_reward_curve(records, run_dir / CURVE_FILE, title=title)
    start_end_figure(run_dir, rows)
    epochs = config.get("run", config).get("epochs", 0)  # config.json before run/ was flat
    plot_signals(rows, int(epochs), run_dir / SIGNALS_FILE)
    index = run_dir / INDEX_FILE
    index.write_text(_html(run_dir, title, records, rows, config))
    return index


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON ({err}); it is written by learner.run") from err


def _html(run_dir: Path, title: str, records: list[dict], evals: list[dict], config: dict) -> str:
    esc = html.escape
    parts = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
        "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "figure{display:inline-block;margin:0 1em 1em 0}img{image-rendering:pixelated}</style>",
        "</head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    summary = reward_summary(records)
    parts.append("<p>" + esc(", ".join(f"{k} {_fmt(v)}" for k, v in summary.items())) + "</p>")
    if (run_dir / CURVE_FILE).is_file() and records:
        parts.append(f'<h2>Reward</h2><img src="{CURVE_FILE}" alt="reward curve">')
    if evals:
        parts.append("<h2>Evaluations (fixed prompts x fixed seeds, paired with the start)</h2>")
        keys = [*EVAL_KEYS, "gain", "gain_se", "t", "kl_base", *HELDOUT_KEYS, *GUARD_KEYS]
        parts += _table(evals, [k for k in keys if any(k in r for r in evals)])
    if (run_dir / SIGNALS_FILE).is_file():
        parts.append(
            "<h2>When to stop: held-out prompts, KL to the base model, guard</h2>"
            f'<img src="{SIGNALS_FILE}" alt="held-out gain, KL and guard">'
        )
    if (run_dir / START_END_FILE).is_file():
        parts.append(f'<h2>Start and end</h2><img src="{START_END_FILE}" alt="start and end">')
    grids = grid_files(run_dir)
    if grids:
        parts.append("<h2>Image grids (fixed prompts x fixed seeds)</h2>")
        for grid in grids:
            name = esc(grid.name)
            stem = grid.stem.removeprefix("grid_")
            m = re.fullmatch(r"epoch(\d+)", stem)
            label = esc(f"epoch {int(m[1])}" if m else stem)
            parts.append(
                f'<figure><img src="{name}" alt="{name}"><figcaption>{label}</figcaption></figure>'
            )
    if records:
        keys = [k for k in TABLE_KEYS if any(k in r for r in records)]
        keys += sorted({k for r in records for k in r} - set(keys))
        parts.append("<h2>Metrics per epoch</h2>")
        parts += _table(records, keys)
    if config:
        parts.append("<h2>Config</h2><pre>" + esc(json.dumps(config, indent=2)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _table(rows: list[dict], keys: list[str]) -> list[str]:
    """An HTML table of `rows` (dicts) with a column per key, escaped."""
    esc = html.escape
    head = "".join(f"<th>{esc(k)}</th>" for k in keys)
    body = [
        "<tr>" + "".join(f"<td>{esc(_fmt(row.get(k)))}</td>" for k in keys) + "</tr>"
        for row in rows
    ]
    return [f"<table><tr>{head}</tr>", *body, "</table>"]


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class TensorBoardWriter:
    """TensorBoard scalars (every numeric metric) and images (the grids) for a run directory.

    Needs `torch.utils.tensorboard` and the `tensorboard` package (an optional dependency)."""

    def __init__(self, log_dir: Path):
        try:
            import tensorboard  # noqa: F401  # torch's writer imports it lazily; fail here, clearly
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                f"--tensorboard needs the tensorboard package ({err}); install it with "
                "`pip install tensorboard`, or run without --tensorboard"
            ) from err
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, record: dict[str, Any], step: int) -> None:
        """Every finite number of an epoch record, under its key (`reward/aesthetic/mean` ...)."""
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(key, value, global_step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        """A PNG (an image grid) as an HWC uint8 image."""
        import numpy as np
        from PIL import Image

        array = np.asarray(Image.open(path).convert("RGB"))  # [H, W, 3] uint8
        self.writer.add_image(tag, array, global_step=step, dataformats="HWC")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        sys.exit("usage: python -m learner.report RUN_DIR")
    try:
        print(write_report(Path(args[0])))
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
