"""Errors that stop a run, each saying how to go on."""

from __future__ import annotations

from pathlib import Path


class LearnerLost(RuntimeError):
    """The learner actor died; the run can go on from its last checkpoint."""

    def __init__(self, run_dir: Path, cause: BaseException):
        super().__init__(
            f"the learner actor was lost ({type(cause).__name__}); continue the run from its last "
            f"checkpoint with: python -m learner.run --resume {run_dir}  (or pass --auto-resume "
            "to have a new learner started from the checkpoint automatically)"
        )


class BatchesLost(Exception):
    """Trajectories of an epoch were lost with a node before the learner read them (the epoch
    is sampled again)."""

    def __init__(self, batches: int):
        super().__init__(f"{batches} batches")
        self.batches = batches


class RewardBroken(RuntimeError):
    """Too many batches in a row had non-finite or failed rewards."""


class ActorsPending(RuntimeError):
    """Actors of the run could not start: no node has room for them and none can be added."""
