"""Async mode: samplers never wait for the learner, the learner never waits for a full epoch.

Each sampler keeps `max_inflight` calls going; every finished batch is scored by the reward
actors and queued. Whenever the learner is idle and `num_batches_per_epoch` scored batches are
queued, it trains on them; a batch sampled with version v is trained by version c only if
c - v <= max_staleness, else it is dropped and counted. The importance ratio uses the behaviour
log-probs recorded at sampling time, so the staleness is corrected, not ignored.

Accounting: every batch id is either trained once, dropped (stale or non-finite reward) or left
unused at the end; `batches_sampled = batches_trained + batches_dropped_* + batches_unused`.
A batch lost with its sampler has no id yet: it is counted in `batches_lost` and sampled again
(same prompts and seeds) once the restarted sampler has the newest weights.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from ddpo.config import Config
from learner.errors import LearnerLost
from learner.learner import UPDATE_METRICS
from rewards import combine_rewards, sample_records


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
class Scored:
    """A scored batch waiting for the learner."""

    traj: Any
    meta: dict
    prompts: list[str]
    rewards: np.ndarray
    per_term: dict[str, np.ndarray]


def batch_schedule(config: Config, n: int) -> tuple[list[str], np.ndarray]:
    """Prompts and seeds of the n-th batch of an async run, a function of (seed, n)."""
    rng = np.random.default_rng([config.seed, n, 1])
    b = config.sample.batch_size
    prompts = [config.prompts[i] for i in rng.integers(len(config.prompts), size=b)]
    return prompts, rng.integers(0, 2**31 - 1, size=b, dtype=np.int64)


def run_async(driver: Any) -> list[dict]:
    """The async loop over a `learner.driver.Driver`'s actors (Ray only)."""
    config: Config = driver.config
    ray = driver.wiring.ray
    nb, k_max = config.sample.num_batches_per_epoch, config.max_staleness
    version = driver.begin()
    history = driver.history  # the updates so far (those before a checkpoint resumed from)

    pending: dict[Any, Pending] = {}  # keyed by the ref that says the batch is scored
    inflight = [0] * len(driver.samplers)
    ready: list[Scored] = []
    totals: Counter[str] = Counter()
    interval: Counter[str] = Counter()  # since the last update
    busy = {"sampler": 0.0, "learner": 0.0}
    update_ref, update_batches, update_started = None, [], 0.0
    n_next, start = 0, time.time()
    retry: list[tuple[list[str], np.ndarray]] = []  # batches lost with a sampler, to resample

    def restore() -> None:
        """Go on from the checkpoint the driver restored: its counters and batch cursor. What was
        queued or in flight is let go; the checkpoint counted its queue as unused."""
        nonlocal ready, n_next, start, history, update_ref, version
        state = driver.restored
        totals.clear()
        totals.update(state.get("totals", {}))
        n_next = state.get("next_batch", 0)
        retry[:] = [(p, np.asarray(s, np.int64)) for p, s in state.get("retry", [])]
        history = driver.history
        start = time.time() - (history[-1]["wall_seconds"] if history else 0.0)
        ready, update_ref = [], None
        pending.clear()
        inflight[:] = [0] * len(inflight)
        interval.clear()
        version = driver.publish()

    if driver.restored:
        restore()

    metrics_file = (driver.run_dir / "metrics.jsonl").open("a")
    samples_file = (driver.run_dir / "samples.jsonl").open("a")

    def submit(i: int) -> None:
        nonlocal n_next
        if retry:
            prompts, seeds = retry.pop(0)
        else:
            prompts, seeds = batch_schedule(config, n_next)
            n_next += 1
        min_version = max(0, version - k_max)  # never sample with weights already too stale
        traj, reward_input, meta = driver.call_sampler(i, prompts, seeds, min_version)
        scores = {name: pool.score(reward_input) for name, pool in driver.pools.items()}
        pending[list(scores.values())[-1]] = Pending(i, traj, meta, scores, prompts, seeds)
        inflight[i] += 1

    def receive(p: Pending) -> None:
        inflight[p.sampler] -= 1
        try:
            meta = ray.get(p.meta)
            results = {name: ray.get(ref) for name, ref in p.scores.items()}
        except driver.wiring.actor_errors as err:  # lost with its sampler: sample it again
            for name, ref in p.scores.items():
                driver.pools[name].done(ref)
            totals["batches_lost"] += 1
            driver.recover_sampler(p.sampler, err)
            retry.append((p.prompts, p.seeds))
            return
        for name, ref in p.scores.items():
            driver.pools[name].done(ref)
        busy["sampler"] += meta["seconds"]
        totals["batches_sampled"] += 1
        interval["samples_sampled"] += meta["samples"]
        rewards, info = combine_rewards(driver.terms, results)
        if not np.isfinite(rewards).all():
            totals["batches_dropped_nonfinite"] += 1
            interval["batches_dropped_nonfinite"] += 1
            driver.bad_batch(f"batch {meta['batch_id']}", rewards, info)
            return
        driver.bad_in_row = 0
        for record in sample_records(p.prompts, rewards, info):
            samples_file.write(json.dumps({"batch_id": meta["batch_id"], **record}, default=float))
            samples_file.write("\n")
        per_term = {name: np.asarray(r, np.float32) for name, (r, _) in results.items()}
        ready.append(Scored(p.traj, meta, p.prompts, rewards, per_term))

    def drop_stale() -> None:
        # Batches the next update could not use: too old for the current version.
        nonlocal ready
        fresh = [s for s in ready if version - s.meta["policy_version"] <= k_max]
        dropped = len(ready) - len(fresh)
        totals["batches_dropped_stale"] += dropped
        interval["batches_dropped_stale"] += dropped
        ready = fresh

    def start_update() -> None:
        nonlocal update_ref, update_batches, update_started, ready
        update_batches, ready = ready[:nb], ready[nb:]
        prompts = [p for s in update_batches for p in s.prompts]
        rewards = np.concatenate([s.rewards for s in update_batches])
        advantages = driver.advantages(prompts, rewards)
        update_started = time.time()
        update_ref = driver.learner.update.remote(
            advantages, rewards, *[s.traj for s in update_batches]
        )

    def finish_update() -> None:
        nonlocal update_ref, version
        update = driver.from_learner(update_ref)
        update_ref = None
        busy["learner"] += time.time() - update_started
        totals["batches_trained"] += len(update_batches)
        rewards = np.concatenate([s.rewards for s in update_batches])
        staleness = Counter(version - s.meta["policy_version"] for s in update_batches)
        wall = time.time() - start
        record = {
            "epoch": len(history),
            "policy_version": version,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            **{k: update.get(k) for k in UPDATE_METRICS},
            "samples": int(len(rewards)),
            "seconds": round(wall - (history[-1]["wall_seconds"] if history else 0.0), 3),
            "wall_seconds": round(wall, 3),
            "staleness": update.get("staleness_mean"),
            "staleness_max": max(staleness),
            "queue_depth": len(ready),
            "inflight": sum(inflight),
            "busy/sampler": busy["sampler"] / (wall * len(driver.samplers)),
            "busy/learner": busy["learner"] / wall,
            **{f"staleness/hist/{k}": n for k, n in sorted(staleness.items())},
            **{k: v for k, v in update.items() if k.startswith("staleness/")},
            **{k: interval[k] for k in ("batches_dropped_stale", "batches_dropped_nonfinite")},
            **{f"total/{k}": v for k, v in totals.items()},
        }
        if len(driver.terms) > 1:
            for name in driver.pools:
                values = np.concatenate([s.per_term[name] for s in update_batches])
                record[f"reward/{name}/mean"] = float(values.mean())
                record[f"reward/{name}/std"] = float(values.std())
        interval.clear()
        history.append(record)
        driver.log(record, metrics_file)
        samples_file.flush()
        version = driver.publish()  # the newest weights ref replaces the last one
        drop_stale()
        driver.evaluate_due(len(history))
        if driver.checkpoint_due(len(history)) or driver.stop_reason:
            save_checkpoint()

    def save_checkpoint() -> None:
        samples_file.flush()
        # A resume starts with an empty queue: count what is queued now as unused.
        saved = totals + Counter({"batches_unused": len(ready)})
        driver.save_checkpoint(
            len(history),
            totals=dict(saved),
            next_batch=n_next,
            retry=[(p, s.tolist()) for p, s in retry],
        )

    def loop() -> None:
        nonlocal ready
        while len(history) < config.epochs and not driver.stop_reason:  # or the guard fired
            driver.resize_rewards()
            for i in range(len(driver.samplers)):
                while inflight[i] < config.max_inflight:
                    submit(i)
            waiting = list(pending) + ([update_ref] if update_ref is not None else [])
            done, _ = ray.wait(waiting, num_returns=1)
            for ref in done:
                if update_ref is not None and ref == update_ref:
                    finish_update()
                else:
                    receive(pending.pop(ref))
            drop_stale()
            # Bounded queue: keep at most what the next max_staleness + 1 updates can use.
            overflow = max(0, len(ready) - nb * (k_max + 1))
            if overflow:
                ready = ready[overflow:]
                totals["batches_dropped_stale"] += overflow
                interval["batches_dropped_stale"] += overflow
            if update_ref is None and len(ready) >= nb and len(history) < config.epochs:
                start_update()

    try:
        while True:
            try:
                loop()
                break
            except LearnerLost as err:
                samples_file.flush()  # the restore cuts the logs back to the checkpoint
                metrics_file.close()
                driver.replace_learner(err)  # raises unless --auto-resume
                restore()
                metrics_file = (driver.run_dir / "metrics.jsonl").open("a")
        # Account for what is still in flight: sampled, never trained.
        for p in list(pending.values()):
            receive(p)
        pending.clear()
        totals["batches_unused"] += len(ready)
    finally:
        metrics_file.close()
        samples_file.close()
    (driver.run_dir / "accounting.json").write_text(json.dumps(dict(totals), indent=2) + "\n")

    driver.finish()
    return history
