"""The sync driver: DDPO epochs as the paper runs them; `learner.run` is its command line.

    history = train(config)                   # on a local Ray instance (or config.run.address)
    history = train(config, InProcess())      # every part in this process, no Ray

One epoch (`Driver.epoch`): publish the LoRA weights, sample, score, compute advantages, update;
then log, evaluate, checkpoint. The actors are a `learner.fleet.Fleet`, the sinks a
`learner.runlog.RunLog`, both held by the `learner.session.Session` the driver is; async mode
is the peer loop `learner.async_driver.AsyncDriver` over the same parts.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from tqdm import tqdm

from ddpo.config import Config
from learner import checkpoint
from learner.async_driver import AsyncDriver
from learner.checkpoint import Checkpoint
from learner.errors import BatchesLost, LearnerLost
from learner.evaluator import grid_schedule
from learner.fleet import RESTARTS
from learner.runlog import SAMPLES, checked_log_cuts
from learner.scoring import Scored, epoch_schedule, score_batch, update_record
from learner.session import MAX_AUTO_RESUMES, Session
from learner.wiring import Wiring

__all__ = [
    "MAX_AUTO_RESUMES",
    "Driver",
    "EmptyEpoch",
    "checked_log_cuts",
    "epoch_schedule",
    "grid_schedule",
    "train",
]

log = logging.getLogger(__name__)


class EmptyEpoch(Exception):
    """Every batch of an epoch was dropped (bad rewards); `BadRewards` bounds how often."""


class Driver(Session):
    """Drives a run's epochs: sync here; `config.system.mode == "async"` hands the run to
    `AsyncDriver` over the same parts."""

    # (epochs done, bytes of samples.jsonl) while the learner holds exactly the state after
    # those epochs: what a Ctrl-C may checkpoint (sync mode).
    resumable: tuple[int, int] | None = None

    def run(self) -> list[dict]:
        """Run `config.run.epochs` DDPO epochs; return the per-epoch (per-update) metrics."""
        try:
            with self.beat.phase("starting the actors"):
                self.fleet.wait_started()
            if self.config.system.mode == "async":
                with self.beat.phase("training (async)"):
                    return AsyncDriver(self).run()
            self.begin()
            self._epochs()
            self.finish()
            return self.history
        except KeyboardInterrupt:
            self.save_interrupted()
            raise
        finally:
            self.runlog.close()
            self.fleet.shutdown()

    def _epochs(self) -> None:
        """Epochs until `config.run.epochs` or a fired guard, with the one retry layer: an epoch
        whose batches were all dropped or whose trajectories a lost node took is run again
        (the learner has not changed); a lost learner is replaced from the last checkpoint
        (--auto-resume) and the epochs go on from there."""
        epoch, losses = self.start_epoch, 0
        while epoch < self.config.run.epochs:
            tracker, logged = self.tracker.state_dict(), self.runlog.size(SAMPLES)
            self.resumable = (epoch, logged)
            try:
                with self.beat.phase(f"epoch {epoch}"):
                    record = self.epoch(epoch)
                self.history.append(record)
                self.log(record)
                epoch, losses = epoch + 1, 0
                self.resumable = (epoch, self.runlog.size(SAMPLES))
                self.evaluate_due(epoch)
                if self.checkpoint_due(epoch) or self.stop_reason:
                    self.save_checkpoint(epoch)
                if self.stop_reason:
                    log.warning("%s", self.stop_reason)
                    break
            except EmptyEpoch as err:  # a run of bad rewards; too long a run stops in BadRewards
                log.warning("%s; sampling it again", err)
            except BatchesLost as err:
                losses += 1
                if losses > RESTARTS:
                    raise RuntimeError(f"epoch {epoch}: trajectories lost {losses} times") from err
                self.fleet.lost_batches += err.batches
                self.tracker.load_state_dict(tracker)
                self.runlog.cut(SAMPLES, logged)
                log.warning("epoch %d: %s lost with a node; running the epoch again", epoch, err)
            except LearnerLost as err:
                self.resumable = None
                self.replace_learner(err)  # raises unless --auto-resume
                self.publish()
                epoch, losses = self.start_epoch, 0

    def epoch(self, epoch: int) -> dict:
        """Publish, sample, score, advantages, update: one sync DDPO epoch; its metrics, with
        the wall time of each phase (`seconds/<phase>`)."""
        clock = [time.time()]

        def lap() -> float:
            clock.append(time.time())
            return round(clock[-1] - clock[-2], 3)

        self.fleet.resize_rewards()
        version = self.publish()
        t_publish = lap()
        batches = self.sample(epoch)
        # One bar per epoch: a step per sampled-and-scored batch, then the update.
        bar = tqdm(
            total=len(batches) + 1, desc=f"epoch {epoch} sample+score", leave=False, disable=None
        )
        kept, dropped = self.collect(epoch, batches, bar)
        t_sample_score = lap()
        rewards = np.concatenate([s.rewards for s in kept])
        self.resumable = None  # the stat tracker and the learner move on from here
        advantages = self.advantages([p for s in kept for p in s.prompts], rewards)
        bar.set_description(f"epoch {epoch} train")
        update = self.fleet.update(advantages, rewards, [s.traj for s in kept])
        t_update = lap()
        bar.update(1)
        bar.close()
        return update_record(
            epoch,
            version,
            kept,
            update,
            **{k: v for k, v in update.items() if k.startswith("threads/")},
            batches_dropped=dropped,
            batches_lost_total=self.fleet.lost_batches,
            seconds=round(clock[-1] - clock[0], 3),
            **{"seconds/publish": t_publish, "seconds/sample_score": t_sample_score},
            **{"seconds/update": t_update},
        )

    def sample(self, epoch: int) -> list[tuple]:
        """Launch the epoch's sampler calls (every S-th batch to sampler S) and their scores."""
        prompts, seeds = epoch_schedule(self.config, epoch)
        b, s = self.config.sample.batch_size, len(self.fleet.samplers)
        return [
            self.fleet.launch(i % s, prompts[i * b : (i + 1) * b], seeds[i * b : (i + 1) * b])
            for i in range(self.config.sample.num_batches_per_epoch)
        ]

    def collect(self, epoch: int, batches: list[tuple], bar: tqdm) -> tuple[list[Scored], int]:
        """Wait for the rewards: the scored batches in sample order, and how many were dropped
        (a non-finite reward); their samples go to samples.jsonl."""
        kept: list[Scored] = []
        for batch in batches:
            (_, prompts, _, traj, _), results = self.fleet.collect(batch)
            bar.update(1)
            scored = score_batch(
                self.fleet.terms, traj, prompts, results, self.bad, f"epoch {epoch}"
            )
            if scored is not None:
                kept.append(scored)
                self.runlog.samples(scored.records, epoch=epoch)
        if not kept:
            raise EmptyEpoch(f"epoch {epoch}: every batch was dropped")
        return kept, len(batches) - len(kept)

    def save_interrupted(self) -> None:
        """After Ctrl-C or SIGTERM: checkpoint the epochs done, unless one is already saved or
        the learner was inside an update (sync mode; an async run goes on from its last
        checkpoint). The unfinished epoch's samples are cut from samples.jsonl first."""
        if self.resumable is None or not self.config.run.save_every:
            return
        (done, logged), self.resumable = self.resumable, None
        path = checkpoint.checkpoint_dir(self.run_dir) / f"epoch-{done:06d}"
        if path.is_dir() and checkpoint.verify(path) is None:
            return
        self.runlog.cut(SAMPLES, logged)
        self.save_checkpoint(done)


def train(
    config: Config, wiring: Wiring | None = None, resume: Checkpoint | None = None
) -> list[dict]:
    """Run `config.run.epochs` DDPO epochs (from `resume` if given); return the per-epoch metrics,
    those before the checkpoint included."""
    return Driver(config, wiring, resume).run()
