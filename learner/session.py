"""What the sync and the async driver share: a run's fleet of actors, its run log, evaluations,
stat tracker and checkpoints (`Session`). The drivers are the loops over it: `learner.driver`
(sync) and `learner.async_driver` (async)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ddpo.config import Config
from ddpo.lora import save_lora
from learner import checkpoint
from learner.checkpoint import Checkpoint, CheckpointError
from learner.errors import LearnerLost
from learner.evaluator import Evaluator
from learner.fleet import Fleet
from learner.guard import Guard
from learner.heartbeat import Heartbeat
from learner.metrics import run_label
from learner.preflight import check_config
from learner.runlog import RunLog, checked_log_cuts
from learner.scoring import BadRewards
from learner.stat_tracker import PerPromptStatTracker, batch_advantages
from learner.wiring import Wiring
from rewards import REWARDS, parse_reward_spec

log = logging.getLogger(__name__)

MAX_AUTO_RESUMES = 3


class Session:
    """A run's parts: `fleet` (actors), `runlog` (every sink), `evaluator`, the stat tracker,
    and the checkpoint to resume from. A bad config stops here, before anything is written."""

    def __init__(
        self, config: Config, wiring: Wiring | None = None, resume: Checkpoint | None = None
    ):
        self.config = config
        self.resume_from = resume  # restored when the run starts
        self.run_dir = Path(config.run.dir or "runs/run")
        check_config(config)  # a bad reward, pool or --model stops here, before anything is written
        self.run_dir.mkdir(parents=True, exist_ok=True)
        trained = [name for _, name in parse_reward_spec(config.reward)]
        guard = Guard.parse(config.guard, trained, sorted(REWARDS)) if config.guard else None
        run_name = run_label(self.run_dir)  # the `run` label of every ddpo metric
        # Without a terminal the heartbeat says every 30 s what the run is doing.
        self.runlog = RunLog(config, self.run_dir, run_name, Heartbeat())
        self.beat = self.runlog.beat
        self.fleet = Fleet(config, wiring, run_name, guard.reward if guard else None)
        self.evaluator = Evaluator(config, self.fleet, self.runlog, guard)
        self.tracker = PerPromptStatTracker(
            config.stat_tracker.buffer_size, config.stat_tracker.min_count
        )
        self.bad = BadRewards(config.system.max_bad_batches, self.run_dir)
        self.history: list[dict] = []  # one record per epoch (sync) or update (async)
        self.start_epoch = 0  # where the epoch loop starts (> 0 after a resume)
        self.resumes = 0  # learners replaced from a checkpoint (--auto-resume)
        self.restored: dict[str, Any] = {}  # the driver state of the checkpoint resumed from

    # The actors, by their old names (tests, benchmarks).
    samplers = property(lambda self: self.fleet.samplers)
    learner = property(lambda self: self.fleet.learner)
    pools = property(lambda self: self.fleet.pools)

    @property
    def stop_reason(self) -> str | None:
        return self.evaluator.stop_reason

    def resize_rewards(self) -> None:
        self.fleet.resize_rewards()

    def publish(self) -> int:
        return self.fleet.publish()

    def grid(self, when: int | str, image: bool = True) -> dict | None:
        return self.evaluator.grid(when, image)

    def advantages(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        if self.config.stat_tracker.per_prompt:
            return self.tracker.update(prompts, rewards)
        return batch_advantages(rewards)

    def log(self, record: dict) -> None:
        """An epoch's (or update's) record, with the reward pools' sizes and busy fractions."""
        record.update(self.fleet.pool_metrics())
        self.runlog.record(record)

    # ----- start, end, evaluations -----
    def begin(self) -> int:
        """Restore the checkpoint to resume from, or start fresh: the start grid, checkpoint 0
        (so that even the first epochs can be resumed). Publishes the weights; returns the
        version."""
        if self.resume_from is not None:
            self.restore(self.resume_from)
            return self.publish()
        self.runlog.start()
        version = self.publish()
        with self.beat.phase("the start evaluation"):
            self.grid("start")
        self.save_checkpoint(0)
        return version

    def finish(self) -> None:
        """The trained LoRA (diffusers format) and the end grid."""
        self.publish()
        save_lora(self.fleet.lora(), self.run_dir / "lora")
        with self.beat.phase("the end evaluation"):
            self.grid("end")

    def evaluate_due(self, done: int) -> None:
        """After `done` epochs/updates (not the last: `finish` evaluates that): a grid every
        grid_every, a scored evaluation every eval_every."""
        if done == self.config.run.epochs:
            return
        grid_every, eval_every = self.config.run.grid_every, self.config.run.eval_every
        image = bool(grid_every) and done % grid_every == 0
        if image or (eval_every and done % eval_every == 0):
            if (
                self.config.system.mode == "sync"
            ):  # evaluate the weights just trained, not the last sent
                self.publish()
            with self.beat.phase(f"the evaluation after {done}"):
                self.grid(done, image=image)

    def checkpoint_due(self, done: int) -> bool:
        """After `done` epochs/updates: every save_every, and at the end."""
        every = self.config.run.save_every
        return bool(every) and (done % every == 0 or done == self.config.run.epochs)

    # ----- checkpoints -----
    def save_checkpoint(self, epoch: int, **driver_state: Any) -> Path | None:
        """Checkpoint after `epoch` epochs (updates in async mode). A failed write (a full disk)
        keeps the previous checkpoint, says so and lets the run go on; the next save retries."""
        if not self.config.run.save_every:
            return None
        tensors, learner_state = self.fleet.ask_learner("state", num_returns=2)
        state = {
            "learner": learner_state,
            "driver": {
                "tracker": self.tracker.state_dict(),
                "lost_batches": self.fleet.lost_batches,
                # bytes of each log at this point; a resume cuts what follows
                "logs": self.runlog.sizes(),
                **driver_state,
            },
            "config": dataclasses.asdict(self.config),
        }
        try:
            path = checkpoint.save(
                self.run_dir, epoch, tensors, state, self.history, self.config.run.keep_checkpoints
            )
        except OSError as err:
            log.error("checkpoint %d not written (%s); the previous one is kept", epoch, err)
            return None
        log.info("checkpoint %s", path)
        return path

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from `ckpt`: learner state, stat tracker, counters, and the run's logs cut back
        to what they held when it was written (so no epoch appears twice)."""
        # Before anything changes: the tensors against the model, the log cuts against the run.
        self.runlog.flush()
        problem = self.fleet.ask_learner("check_state", ckpt.tensors, ckpt.state["learner"])
        if problem:
            raise CheckpointError(f"checkpoint {ckpt.path}: {problem}")
        cuts = checked_log_cuts(self.run_dir, ckpt.state["driver"]["logs"])
        # Every rank of a learner group loads the same checkpoint (rank 0 wrote it).
        version = self.fleet.tell_learners("load_state", ckpt.tensors, ckpt.state["learner"])
        self.restored = ckpt.state["driver"]
        self.tracker.load_state_dict(self.restored["tracker"])
        self.fleet.lost_batches = self.restored["lost_batches"]
        self.history = list(ckpt.metrics)
        self.start_epoch = ckpt.epoch
        self.runlog.resume(cuts, ckpt.metrics)
        log.info("resumed from %s: epoch %d, policy version %d", ckpt.path, ckpt.epoch, version)

    def replace_learner(self, err: LearnerLost) -> None:
        """--auto-resume: a new learner from the last checkpoint, or `err` if that is not on."""
        if not self.config.run.auto_resume or self.resumes >= MAX_AUTO_RESUMES:
            raise err
        ckpt = checkpoint.latest(self.run_dir)
        if ckpt is None:
            raise err
        self.resumes += 1
        log.warning(
            "%s; auto-resume %d of %d from %s",
            err.__cause__ or err,
            self.resumes,
            MAX_AUTO_RESUMES,
            ckpt.path,
        )
        self.fleet.replace_learner()
        self.restore(ckpt)
