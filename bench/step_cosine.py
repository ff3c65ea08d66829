"""How the optimizer steps of an epoch relate: the cosine between consecutive LoRA updates and
their norms, in one 8-epoch run of the compressibility preset (seed 0) at a given clip range.

    python bench/step_cosine.py 2e-3     # the preset
    python bench/step_cosine.py 1.0      # nothing clipped

The run goes through the driver's own code path (in one process); every optimizer step's
update is recorded by wrapping `Learner._optimizer_step`.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector

from ddpo.config import override
from ddpo.presets import task_config
from learner.driver import Driver
from learner.learner import Learner
from learner.wiring import InProcess

EPOCHS = 8


def record_updates() -> list[torch.Tensor]:
    """Wrap Learner._optimizer_step so that each step's change of the LoRA weights is kept."""
    updates: list[torch.Tensor] = []
    step = Learner._optimizer_step

    def recorded(self: Learner) -> float:
        params = self.policy.trainable_parameters()
        before = parameters_to_vector(params).detach().clone()
        out = step(self)
        updates.append(parameters_to_vector(params).detach() - before)
        return out

    Learner._optimizer_step = recorded  # type: ignore[method-assign]
    return updates


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float(torch.nn.functional.cosine_similarity(a, b, dim=0)), 3)


def main(clip_range: float) -> None:
    updates = record_updates()
    config = task_config("compressibility", "tiny")
    with tempfile.TemporaryDirectory() as tmp:
        changes = {
            "run.epochs": EPOCHS,
            "seed": 0,
            "run.dir": Path(tmp) / "run",
            "run.eval_every": 0,
            "train.clip_range": clip_range,
        }
        config = dataclasses.replace(override(config, changes), heldout_prompts=())
        Driver(config, InProcess()).run()
    per_epoch = len(updates) // EPOCHS
    print(f"clip {clip_range}, {per_epoch} steps an epoch")
    print(" an epoch's steps:", [cosine(*updates[i : i + 2]) for i in range(0, len(updates), 2)])
    print(" across epochs:", [cosine(*updates[i : i + 2]) for i in range(1, len(updates) - 1, 2)])
    print(" update norms:", [round(float(u.norm()), 3) for u in updates])


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 2e-3)
