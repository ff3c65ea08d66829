"""What decoupled PPO adds to an update of stale batches, on the tiny compressibility preset.

    python bench/decoupled_update.py                       # plain against decoupled
    python bench/decoupled_update.py --compare-with 6b42d62  # and another commit's learner

One process, on the CPU. The learner of the task's tiny preset trains one update on two batches
of 32 samples (the preset's epoch), then is timed on a second update, whose two batches were
sampled one version earlier (stale, as nearly every batch of an async run with
--max-staleness 1). Three learners take turns, `--repeats` times, each fresh from the same
weights: plain PPO, decoupled PPO (`train.decoupled`, which first computes the stale samples'
proximal log-probs), and with --compare-with, decoupled PPO as `learner/learner.py` of that
commit has it (from `git show`). Each learner's weights after the timed update are compared with
the first decoupled one's. Prints a table and writes bench/results/decoupled_update.json.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tyro
from common import describe, machine, markdown_table, write_json

from ddpo.presets import task_config
from learner.learner import Learner


@dataclass(frozen=True)
class Args:
    task: str = "compressibility"
    """The tiny preset whose update is timed."""
    repeats: int = 5
    """Timed updates of each learner, taken in turns; the median is reported."""
    threads: int = 2
    """torch intra-op threads."""
    compare_with: str | None = None
    """A git commit whose learner/learner.py is timed too, as "decoupled at <commit>"."""
    out: Path = Path("bench/results/decoupled_update.json")


def learner_at(commit: str) -> type:
    """The Learner class of `learner/learner.py` at `commit`."""
    source = subprocess.run(
        ["git", "show", f"{commit}:learner/learner.py"], capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"learner_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Learner


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    base = task_config(args.task, "tiny")
    s = base.sample

    def make(cls: type, decoupled: bool) -> Any:
        """A learner of `cls` that builds its own policy, as the learner actor does."""
        return cls(
            dataclasses.replace(base, train=dataclasses.replace(base.train, decoupled=decoupled))
        )

    learners: dict[str, tuple[type, bool]] = {
        "plain": (Learner, False),
        "decoupled": (Learner, True),
    }
    if args.compare_with:
        learners[f"decoupled at {args.compare_with}"] = (learner_at(args.compare_with), True)

    # Two epochs' batches, all sampled with the starting weights (version 0).
    sampler = make(Learner, False).policy
    n, b = s.batch_size * s.num_batches_per_epoch, s.batch_size
    prompts = [base.prompts[i % len(base.prompts)] for i in range(n)]
    epochs = [
        [
            sampler.sample(
                prompts[i : i + b], list(range(e * n + i, e * n + i + b)), batch_id=f"{e}-{i}"
            )
            for i in range(0, n, b)
        ]
        for e in range(2)
    ]
    advantages = [np.random.default_rng(e).standard_normal(n).astype(np.float32) for e in range(2)]

    seconds: dict[str, list[float]] = {name: [] for name in learners}
    weights: dict[str, dict[str, torch.Tensor]] = {}
    metrics: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        for name, (cls, decoupled) in learners.items():
            learner = make(cls, decoupled)
            learner.update(advantages[0], advantages[0], *epochs[0])
            start = time.perf_counter()
            metrics[name] = learner.update(advantages[1], advantages[1], *epochs[1])
            seconds[name].append(time.perf_counter() - start)
            weights[name] = learner.weights()[1]
            assert metrics[name]["staleness_max"] == 1

    reference = weights["decoupled"]
    plain = float(np.median(seconds["plain"]))
    rows, results = [], {}
    for name in learners:
        median = float(np.median(seconds[name]))
        diff = max((weights[name][k] - reference[k]).abs().max().item() for k in reference)
        results[name] = {
            "seconds": seconds[name],
            "median_seconds": median,
            "over_plain": median / plain,
            "max_abs_weight_difference_to_decoupled": diff,
            "clipfrac": metrics[name]["clipfrac"],
            "approx_kl": metrics[name]["approx_kl"],
        }
        rows.append([name, f"{median:.2f}", f"{median / plain:.2f}", f"{diff:.2g}"])
    facts = machine() | {"threads": args.threads, "task": args.task, "samples": n}
    print(describe(facts))
    print(markdown_table(["update", "s (median)", "x plain", "max |w - decoupled's|"], rows))
    write_json(args.out, {"machine": facts, "args": dataclasses.asdict(args)} | results)


if __name__ == "__main__":
    main(tyro.cli(Args))
