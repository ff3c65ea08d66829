"""Async mode: the samplers sample while the learner trains, and the learner never waits for
a full epoch.

Every finished batch is scored by the reward actors and queued. Whenever the learner is idle
and `num_batches_per_epoch` scored batches are queued, it trains on them; a batch sampled with
version v is trained by version c only if c - v <= max_staleness, else it is dropped and
counted. The importance ratio uses the behaviour
log-probs recorded at sampling time, so the staleness is corrected, not ignored.

Backpressure: a sampler call starts only when the next update will train its batch (`room`).
The queue, counting calls in flight, holds at most one update's batches, and a call starts
during an update only if max_staleness >= 1 (its batch will be one version old). So no batch is
sampled to be dropped, and samplers that are ahead leave their cores to the learner. Each
sampler still has at most `max_inflight` calls.

Accounting: every batch id is either trained once, dropped (stale or non-finite reward) or left
unused at the end; `batches_sampled = batches_trained + batches_dropped_* + batches_unused`.
A batch lost with its sampler has no id yet: it is counted in `batches_lost` and sampled again
(same prompts and seeds) once the restarted sampler has the newest weights.

The peer of the sync `learner.driver.Driver`, over the same `learner.session.Session` (fleet,
run log, evaluations, checkpoints); on Ray or, for debugging, in one process.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from learner.errors import LearnerLost
from learner.scoring import Scored, batch_schedule, score_batch, update_record

if TYPE_CHECKING:
    from learner.group import GroupCall
    from learner.session import Session

__all__ = ["AsyncDriver", "AsyncState", "batch_schedule"]


@dataclass
class Pending:
    """A sampler call in flight: its refs and what the driver needs to know about it."""

    sampler: int
    traj: Any  # ObjectRef[Trajectory]
    meta: Any  # ObjectRef[dict]: batch_id, policy_version, samples, seconds
    scores: dict[str, Any]  # reward name -> ObjectRef[(rewards, info)]
    prompts: list[str]
    seeds: np.ndarray


@dataclass
class AsyncState:
    """What an async checkpoint keeps besides the learner and the stat tracker: the counters,
    the batch cursor and the batches lost with a sampler, to sample again."""

    totals: Counter[str] = field(default_factory=Counter)
    next_batch: int = 0
    retry: list[tuple[list[str], np.ndarray]] = field(default_factory=list)

    @classmethod
    def restored(cls, driver_state: dict) -> AsyncState:
        return cls(
            Counter(driver_state.get("totals", {})),
            driver_state.get("next_batch", 0),
            [(p, np.asarray(s, np.int64)) for p, s in driver_state.get("retry", [])],
        )

    def saved(self, queued: int) -> dict:
        """The checkpoint's driver fields. A resume starts with an empty queue: what is queued
        now is counted as unused."""
        return {
            "totals": dict(self.totals + Counter({"batches_unused": queued})),
            "next_batch": self.next_batch,
            "retry": [(p, s.tolist()) for p, s in self.retry],
        }


class AsyncDriver:
    """The async loop over a session's fleet and run log."""

    def __init__(self, session: Session):
        self.session, self.fleet, self.runlog = session, session.fleet, session.runlog
        self.config = session.config
        self.state = AsyncState()
        self.busy = {"sampler": 0.0, "learner": 0.0}  # seconds each role worked
        self.fresh()

    def fresh(self) -> None:
        """Nothing queued or in flight: at the start, and after a learner was replaced."""
        self.pending: list[Pending] = []
        self.inflight = [0] * len(self.fleet.samplers)
        self.ready: list[Scored] = []
        self.interval: Counter[str] = Counter()  # since the last update
        self.update: GroupCall | None = None  # the learner ranks' update calls
        self.update_result: dict | None = None
        self.update_batches: list[Scored] = []
        self.update_started = 0.0

    def restore(self) -> None:
        """Go on from the checkpoint the session restored: its counters and batch cursor. What
        was queued or in flight is let go; the checkpoint counted its queue as unused."""
        self.state = AsyncState.restored(self.session.restored)
        history = self.session.history
        self.start = time.time() - (history[-1]["wall_seconds"] if history else 0.0)
        self.fresh()
        self.version = self.session.publish()

    def run(self) -> list[dict]:
        s = self.session
        self.version, self.start = s.begin(), time.time()
        if s.restored:
            self.restore()
        while True:
            try:
                self.loop()
                break
            except LearnerLost as err:
                s.replace_learner(err)  # raises unless --auto-resume; cuts the logs back
                self.restore()
        # Account for what is still in flight: sampled, never trained.
        for p in self.pending:
            self.receive(p)
        self.pending = []
        self.state.totals["batches_unused"] += len(self.ready)
        accounting = json.dumps(dict(self.state.totals), indent=2) + "\n"
        (s.run_dir / "accounting.json").write_text(accounting)
        s.finish()
        return s.history

    def loop(self) -> None:
        c, s, nb = self.config, self.session, self.config.sample.num_batches_per_epoch
        while len(s.history) < c.run.epochs and not s.stop_reason:  # or the guard fired
            self.fleet.resize_rewards()
            for _ in range(self.room()):
                i = min(range(len(self.inflight)), key=self.inflight.__getitem__)
                if self.inflight[i] >= c.system.max_inflight:
                    break
                self.submit(i)
            # The update first: in one process every call has returned, and it must not starve.
            updating = self.update.waiting if self.update is not None else []
            waiting = updating + [list(p.scores.values())[-1] for p in self.pending]
            done = self.fleet.wiring.wait(waiting, num_returns=1)
            ranks = [i for i in done if i < len(updating)]  # learner ranks that have answered
            if ranks and self.update is not None:
                self.update_result = self.fleet.update_done(self.update, ranks)
                if self.update_result is not None:
                    self.finish_update()
            gone = {id(self.pending[i - len(updating)]) for i in done if i >= len(updating)}
            for p in [p for p in self.pending if id(p) in gone]:
                self.pending.remove(p)
                self.receive(p)
            self.drop_stale()
            if self.update is None and len(self.ready) >= nb and len(s.history) < c.run.epochs:
                self.start_update()

    def room(self) -> int:
        """How many sampler calls to start now: those whose batches the next update will train.
        The samplers hold the published version, so a call started now samples with it. If no
        update runs, the next one is trained by that version; if one runs, by the next version,
        so its batch is one version old, and with max_staleness 0 it would be dropped. No call
        starts for an update the run will not make."""
        c, nb = self.config, self.config.sample.num_batches_per_epoch
        updates_left = c.run.epochs - len(self.session.history) - (self.update is not None)
        if updates_left <= 0 or (self.update is not None and c.system.max_staleness == 0):
            return 0
        return max(0, nb - len(self.ready) - len(self.pending))

    def submit(self, i: int) -> None:
        if self.state.retry:
            prompts, seeds = self.state.retry.pop(0)
        else:
            prompts, seeds = batch_schedule(self.config, self.state.next_batch)
            self.state.next_batch += 1
        # Never sample with weights already too stale.
        min_version = max(0, self.version - self.config.system.max_staleness)
        traj, reward_input, meta = self.fleet.call_sampler(i, prompts, seeds, min_version)
        scores = {name: pool.score(reward_input) for name, pool in self.fleet.pools.items()}
        self.pending.append(Pending(i, traj, meta, scores, prompts, seeds))
        self.inflight[i] += 1

    def receive(self, p: Pending) -> None:
        fleet, totals = self.fleet, self.state.totals
        self.inflight[p.sampler] -= 1
        try:
            meta = fleet.wiring.get(p.meta)
            results = {name: fleet.wiring.get(ref) for name, ref in p.scores.items()}
        except fleet.wiring.actor_errors as err:  # lost with its sampler: sample it again
            fleet.release(p.scores)
            totals["batches_lost"] += 1
            fleet.recover_sampler(p.sampler, err)
            self.state.retry.append((p.prompts, p.seeds))
            return
        fleet.release(p.scores)
        self.busy["sampler"] += meta["seconds"]
        totals["batches_sampled"] += 1
        self.interval["samples_sampled"] += meta["samples"]
        where = f"batch {meta['batch_id']}"
        scored = score_batch(fleet.terms, p.traj, p.prompts, results, self.session.bad, where)
        if scored is None:
            self.count_dropped("batches_dropped_nonfinite", 1)
            return
        scored.meta = meta
        self.runlog.samples(scored.records, batch_id=meta["batch_id"])
        self.ready.append(scored)

    def count_dropped(self, key: str, n: int) -> None:
        self.state.totals[key] += n
        self.interval[key] += n

    def drop_stale(self) -> None:
        """Drop the batches the next update could not use: too old for the current version."""
        fresh = [s for s in self.ready if self.staleness(s) <= self.config.system.max_staleness]
        self.count_dropped("batches_dropped_stale", len(self.ready) - len(fresh))
        self.ready = fresh

    def staleness(self, scored: Scored) -> int:
        return self.version - scored.meta["policy_version"]

    def start_update(self) -> None:
        nb = self.config.sample.num_batches_per_epoch
        self.update_batches, self.ready = self.ready[:nb], self.ready[nb:]
        prompts = [p for s in self.update_batches for p in s.prompts]
        rewards = np.concatenate([s.rewards for s in self.update_batches])
        advantages = self.session.advantages(prompts, rewards)
        self.update_started = time.time()
        trajs = [s.traj for s in self.update_batches]
        self.update = self.fleet.start_update(advantages, rewards, trajs)

    def finish_update(self) -> None:
        s, batches = self.session, self.update_batches
        update, self.update, self.update_result = self.update_result or {}, None, None
        self.busy["learner"] += time.time() - self.update_started
        self.state.totals["batches_trained"] += len(batches)
        staleness = Counter(self.staleness(b) for b in batches)
        wall, history = time.time() - self.start, s.history
        record = update_record(
            len(history),
            self.version,
            batches,
            update,
            seconds=round(wall - (history[-1]["wall_seconds"] if history else 0.0), 3),
            wall_seconds=round(wall, 3),
            staleness=update.get("staleness_mean"),
            staleness_max=max(staleness),
            queue_depth=len(self.ready),
            inflight=sum(self.inflight),
            **{"busy/sampler": self.busy["sampler"] / (wall * len(self.fleet.samplers))},
            **{"busy/learner": self.busy["learner"] / wall},
            **{f"staleness/hist/{k}": n for k, n in sorted(staleness.items())},
            **{k: v for k, v in update.items() if k.startswith("staleness/")},
            **{k: self.interval[k] for k in ("batches_dropped_stale", "batches_dropped_nonfinite")},
            **{f"total/{k}": v for k, v in self.state.totals.items()},
        )
        self.interval.clear()
        history.append(record)
        s.log(record)
        self.version = s.publish()  # the newest weights ref replaces the last one
        self.drop_stale()
        s.evaluate_due(len(history))
        if s.checkpoint_due(len(history)) or s.stop_reason:
            s.save_checkpoint(len(history), **self.state.saved(len(self.ready)))
