"""`assert_accounting`: the batch accounting of an async run, checked from its accounting.json."""

import json
from pathlib import Path

OUTCOMES = (
    "batches_trained",
    "batches_dropped_stale",
    "batches_dropped_nonfinite",
    "batches_unused",
)


def assert_accounting(run_dir: Path) -> dict:
    """Every sampled batch was trained once, dropped, or left unused at the end; returns the
    run's totals."""
    totals = json.loads((Path(run_dir) / "accounting.json").read_text())
    assert totals["batches_sampled"] == sum(totals.get(k, 0) for k in OUTCOMES), totals
    return totals
