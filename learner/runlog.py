"""The run log: every record a run writes, to every sink.

metrics.jsonl (one record per epoch or update), samples.jsonl (one line per sample), eval.jsonl
(one record per evaluation), the console line, Prometheus (`learner.metrics`) and TensorBoard.
A sink that is off is a null object, so the drivers never ask "is logging on?". On resume the
run log is cut back to what a checkpoint recorded, so that no epoch appears twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import IO, Any

from ddpo.config import Config
from learner.evaluation import read_evals
from learner.heartbeat import Heartbeat
from learner.metrics import metrics_exporter
from learner.report import TensorBoardWriter, write_report

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
EVALS = "eval.jsonl"
RUN_LOGS = (SAMPLES, EVALS)
"""The run's append-only logs that a checkpoint records the size of (metrics.jsonl it holds)."""


def format_record(record: dict) -> str:
    """One console line per epoch; metrics an algorithm does not produce are left out."""
    parts = [
        f"epoch {record['epoch']:3d}",
        f"v{record['policy_version']}",
        f"reward {record['reward_mean']:+.4f} ± {record['reward_std']:.4f}",
    ]
    for key, fmt in (("loss", "+.2e"), ("approx_kl", ".2e"), ("clipfrac", ".3f")):
        if record.get(key) is not None:
            parts.append(f"{key} {record[key]:{fmt}}")
    parts.append(f"{record['seconds']:.1f}s")
    return "  ".join(parts)


def checked_log_cuts(run_dir: Path, logs: Any) -> list[tuple[Path, int]]:
    """The (file, size) cuts a resume makes, from a checkpoint's `driver.logs`. A checkpoint is
    input from disk, maybe from someone else: it may name only the run's own logs, by name, and
    sizes no larger than they are now; anything else is refused before any file is touched."""
    if not isinstance(logs, dict):
        raise ValueError(f"checkpoint: driver.logs is {type(logs).__name__}, not a mapping")
    cuts = []
    for name, size in logs.items():
        if name not in RUN_LOGS:
            raise ValueError(
                f"checkpoint names log {name!r}; a checkpoint may only name {', '.join(RUN_LOGS)} "
                "in its own run directory: this checkpoint is damaged or was tampered with"
            )
        path = run_dir / name
        have = path.stat().st_size if path.exists() else 0
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= have:
            raise ValueError(
                f"checkpoint: {name} size {size!r} is not a byte count within the file's "
                f"{have} bytes: this checkpoint is damaged or was tampered with"
            )
        cuts.append((path, size))
    return cuts


class NullBoard:
    """Stands in for `TensorBoardWriter` when --tensorboard is off."""

    def scalars(self, record: dict[str, Any], step: int) -> None:
        pass

    def image(self, tag: str, path: Path, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class RunLog:
    """The sinks of one run directory. Files are opened on first write and kept open; `size`
    flushes, `cut` truncates, `close` ends every sink and writes the report."""

    def __init__(self, config: Config, run_dir: Path, run_name: str, beat: Heartbeat):
        self.config = config
        self.run_dir = run_dir
        self.beat = beat  # touched by every record: the console shows the run is alive
        self.exporter = metrics_exporter(config.run.metrics_port, config.run.metrics_host, run_name)
        self.board = (
            TensorBoardWriter(run_dir / "tensorboard") if config.run.tensorboard else NullBoard()
        )
        self.files: dict[str, IO[str]] = {}

    def _file(self, name: str) -> IO[str]:
        if name not in self.files:
            self.files[name] = (self.run_dir / name).open("a")
        return self.files[name]

    # ----- records -----
    def record(self, record: dict) -> None:
        """One epoch's (or update's) record, to metrics.jsonl, Prometheus, TensorBoard and the
        console; what samples.jsonl holds so far is flushed with it."""
        f = self._file(METRICS)
        f.write(json.dumps(record) + "\n")
        self.flush()
        self.exporter.update(record)
        self.board.scalars(record, record["epoch"])
        print(format_record(record), flush=True)
        self.beat.touch()

    def samples(self, records: list[dict], **key: Any) -> None:
        """One samples.jsonl line per sample, each starting with `key` (epoch or batch_id)."""
        f = self._file(SAMPLES)
        for record in records:
            f.write(json.dumps(key | record, default=float) + "\n")

    def evaluation(self, record: dict) -> None:
        """Append an evaluation to eval.jsonl, and set the evaluation gauges, paired with the
        run's start evaluation (its first line)."""
        f = self._file(EVALS)
        f.write(json.dumps(record) + "\n")
        f.flush()
        start = record if record["when"] == "start" else read_evals(self.run_dir)[0]
        self.exporter.evaluation(record, start)

    def image(self, tag: str, path: Path, step: int) -> None:
        self.board.image(tag, path, step)

    # ----- sizes, cuts and resumes -----
    def flush(self) -> None:
        for f in self.files.values():
            f.flush()

    def size(self, name: str) -> int:
        """The bytes `name` holds, everything written so far included."""
        self.flush()
        path = self.run_dir / name
        return path.stat().st_size if path.exists() else 0

    def sizes(self) -> dict[str, int]:
        """What a checkpoint records: the bytes of each append-only log now."""
        self.flush()
        return {n: self.size(n) for n in RUN_LOGS if (self.run_dir / n).exists()}

    def cut(self, name: str, size: int) -> None:
        """Cut `name` back to `size` bytes (what follows was written by work now undone)."""
        self.flush()
        with (self.run_dir / name).open("a") as f:
            f.truncate(size)

    def start(self) -> None:
        """A fresh run: config.json, and empty logs (an attempt that stopped before checkpoint
        0 may have left some)."""
        self.write_config()
        self.close_files()
        for name in (METRICS, *RUN_LOGS):
            (self.run_dir / name).write_text("")

    def write_config(self) -> None:
        (self.run_dir / "config.json").write_text(
            json.dumps(dataclasses.asdict(self.config), indent=2, default=str)
        )

    def resume(self, cuts: list[tuple[Path, int]], metrics: list[dict]) -> None:
        """Cut the run log back to a checkpoint: metrics.jsonl holds the checkpoint's records,
        every other log the bytes it held then (`cuts`, from `checked_log_cuts`)."""
        self.write_config()
        self.close_files()
        with (self.run_dir / METRICS).open("w") as f:
            f.writelines(json.dumps(m) + "\n" for m in metrics)
        for path, size in cuts:
            with path.open("a") as f:
                f.truncate(size)

    def close_files(self) -> None:
        for f in self.files.values():
            f.close()
        self.files = {}

    def close(self) -> None:
        """End every sink, then write the run's report (index.html) from its logs."""
        self.close_files()
        self.exporter.close()
        self.beat.close()
        self.board.close()
        if (self.run_dir / METRICS).exists():
            write_report(self.run_dir)
