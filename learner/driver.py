"""The driver: creates a run's actors and drives its epochs (sync here, async in
`learner.async_driver`); `learner.run` is its command line.

    history = train(config)                   # on a local Ray instance (or config.address)
    history = train(config, InProcess())      # every part in this process, no Ray

Each step is one named call: publish the LoRA weights, sample, score, compute advantages,
update, log, checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from actors.reward import RewardWorker, local_role_resources, reward_actor_options
from actors.sampler import Sampler
from ddpo.config import Config
from ddpo.images import save_grid
from ddpo.lora import save_lora
from ddpo.threads import role_threads
from learner import checkpoint
from learner.async_driver import run_async
from learner.checkpoint import Checkpoint, CheckpointError
from learner.errors import LearnerLost, RewardBroken
from learner.evaluation import read_evals
from learner.guard import Guard, evaluation_score
from learner.heartbeat import Heartbeat
from learner.learner import UPDATE_METRICS, Learner
from learner.metrics import metrics_exporter, run_label
from learner.preflight import check_config
from learner.report import TensorBoardWriter, grid_name, write_report
from learner.reward_pool import PoolSize, RewardPool, parse_pool_sizes
from learner.stat_tracker import PerPromptStatTracker, batch_advantages
from learner.wiring import SAMPLER_RESTARTS, InProcess, OnRay, role_options
from rewards import (
    REWARDS,
    combine_rewards,
    parse_reward_options,
    parse_reward_spec,
    parse_reward_urls,
    reward_options,
    sample_records,
)

log = logging.getLogger("learner.run")

MAX_AUTO_RESUMES = 3


def epoch_schedule(config: Config, epoch: int) -> tuple[list[str], np.ndarray]:
    """The prompts and noise seeds of every sample of an epoch, a function of (seed, epoch)."""
    rng = np.random.default_rng([config.seed, epoch])
    n = config.samples_per_epoch
    prompts = [config.prompts[i] for i in rng.integers(len(config.prompts), size=n)]
    return prompts, rng.integers(0, 2**31 - 1, size=n, dtype=np.int64)


def grid_schedule(config: Config, heldout: bool = False) -> tuple[list[str], np.ndarray]:
    """Fixed prompts and seeds for the image grids and evaluations (of the training prompts, or
    of the held-out ones)."""
    prompts = list((config.heldout_prompts if heldout else config.prompts)[: config.grid_prompts])
    rows = [p for p in prompts for _ in range(config.grid_seeds)]
    seeds = np.tile(np.arange(config.grid_seeds, dtype=np.int64) + 10_000, len(prompts))
    return rows, seeds


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


RUN_LOGS = ("samples.jsonl", "eval.jsonl")
"""The run's append-only logs that a checkpoint records the size of (metrics.jsonl it holds)."""


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


class BatchesLost(Exception):
    """Trajectories of an epoch were lost with a node before the learner read them."""

    def __init__(self, batches: int):
        super().__init__(f"{batches} batches")
        self.batches = batches


class EmptyEpoch(Exception):
    """Every batch of an epoch was dropped (bad rewards); `Driver.bad_batch` bounds how often."""


class Driver:
    """Creates the actors of a run and drives its sync epochs; every step is one named call."""

    def __init__(
        self,
        config: Config,
        wiring: InProcess | OnRay | None = None,
        resume: Checkpoint | None = None,
    ):
        self.config = config
        self.resume_from = resume  # restored when the run starts
        self.run_dir = Path(config.run_dir or "runs/run")
        self.run_name = run_label(self.run_dir)  # the `run` label of every ddpo metric
        check_config(config)  # a bad reward, pool or --model stops here, before anything is written
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.terms = parse_reward_spec(config.reward)
        trained = [name for _, name in self.terms]
        self.guard = Guard.parse(config.guard, trained, sorted(REWARDS)) if config.guard else None
        # Every reward scored: the trained ones, and the guard's, on evaluations only.
        scored = config.reward + (f"+0*{self.guard.reward}" if self.guard else "")
        options = reward_options(
            scored, parse_reward_options(config.reward_options), tiny=config.model == "tiny"
        )
        sizes = parse_pool_sizes(config.reward_workers, config.reward_workers_range)
        self.wiring = wiring or OnRay(
            config.address,
            min_cpus=config.num_samplers
            + sum(sizes.get(n, PoolSize()).max for _, n in self.terms)
            + 1
            + bool(self.guard),
            resources={"sampler": config.num_samplers, "learner": 1} | local_role_resources(scored),
        )
        self.exporter = metrics_exporter(config.metrics_port, config.metrics_host, self.run_name)
        self.beat = Heartbeat()  # without a terminal: a line every 30 s without one
        self.board = TensorBoardWriter(self.run_dir / "tensorboard") if config.tensorboard else None

        # Sync mode: samplers run together, then the learner alone; async: all at once. Split
        # the cores so that torch never runs more threads than there are cores.
        threads = os.cpu_count() or 1
        busy_together = config.num_samplers + (config.mode == "async")
        sampler_threads, adaptive = role_threads(max(1, threads // busy_together))
        learner_threads, _ = role_threads(sampler_threads if config.mode == "async" else threads)
        gpu = config.device.startswith("cuda")
        create = self.wiring.create
        self.samplers = [
            create(
                Sampler,
                config,
                i,
                sampler_threads,
                adaptive,
                options=role_options("sampler", gpu, weights_group=config.mode == "async"),
            )
            for i in range(config.num_samplers)
        ]
        w = self.wiring

        urls = parse_reward_urls(config.reward_urls, config.reward)  # served outside the cluster

        def reward_actor_maker(name: str) -> Callable[[], Any]:
            options_of = reward_actor_options(name, gpu=gpu)
            return lambda: create(
                RewardWorker, name, options[name], self.run_name, urls.get(name), options=options_of
            )

        def pool(name: str) -> RewardPool:
            return RewardPool(
                name,
                sizes.get(name, PoolSize()),
                make_actor=reward_actor_maker(name),
                call=lambda actor, reward_input: w.call(actor, "score", reward_input),
                kill=lambda actor: w.kill(actor),
            )

        self.pools = {name: pool(name) for name in trained}
        self.guard_pool = pool(self.guard.reward) if self.guard else None
        self.stop_reason: str | None = None  # set by a fired guard: the run ends early
        best = self.run_dir / "best" / "evaluation.json"  # a resumed run's best so far
        self.best_score = json.loads(best.read_text())["score"] if best.is_file() else -math.inf
        self._control_mtime = 0.0
        self.lost_batches = 0  # batches lost with a sampler and sampled again
        self.bad_in_row = 0  # batches in a row with a non-finite or failed reward
        self.history: list[dict] = []  # one record per epoch (sync) or update (async)
        self.start_epoch = 0  # where the epoch loop starts (> 0 after a resume)
        self.resumes = 0  # learners replaced from a checkpoint (--auto-resume)
        self.restored: dict[str, Any] = {}  # the driver state of the checkpoint resumed from
        # (epochs done, bytes of samples.jsonl) while the learner holds exactly the state after
        # those epochs: what a Ctrl-C may checkpoint (sync mode).
        self.resumable: tuple[int, int] | None = None
        learner_options = role_options("learner", gpu, takes_turns=config.mode == "sync")
        self.make_learner = lambda: create(
            Learner, config, learner_threads, None, adaptive, options=learner_options
        )
        self.learner = self.make_learner()
        self.tracker = PerPromptStatTracker(
            config.stat_tracker.buffer_size, config.stat_tracker.min_count
        )

    # ----- the steps of an epoch -----
    def publish(self) -> int:
        """One object-store copy of the CPU LoRA state dict; every sampler gets its ref. Only the
        newest ref is kept (the previous version's object is freed once samplers drop it)."""
        w = self.wiring
        self.weights = w.call(self.learner, "weights", num_returns=2)  # (version, state) refs
        version = self.from_learner(self.weights[0])
        sent = [self.send_weights(s) for s in self.samplers]
        for i, ref in enumerate(sent):
            try:
                w.get(ref, timeout=30.0)
            except w.actor_errors + w.timeout_errors:  # restarting: weights once it is back
                self.wait_for_sampler(i)
        return version

    def from_learner(self, ref: Any) -> Any:
        """The result of a learner call; the learner's death becomes `LearnerLost`."""
        try:
            return self.wiring.get(ref)
        except self.wiring.actor_errors as err:
            raise LearnerLost(self.run_dir, err) from err

    def send_weights(self, sampler: Any) -> Any:
        version, state = self.weights
        group = "weights" if self.config.mode == "async" else None  # see role_options
        return self.wiring.call(sampler, "set_weights", version, state, group=group)

    def call_sampler(
        self, i: int, prompts: list[str], seeds: np.ndarray, min_version: int, kl: bool = False
    ) -> Any:
        """Start sampler i on one batch: (trajectory, reward input, meta) refs. A sampler that
        died and restarted has no weights: `min_version` makes it refuse to sample with them.
        With `kl` the meta also holds each sample's KL to the base model."""
        w = self.wiring
        return w.call(self.samplers[i], "sample", prompts, seeds, min_version, kl, num_returns=3)

    def recover_sampler(self, i: int, err: BaseException) -> None:
        """After a sampler call failed with its actor: wait for the restart, re-send weights."""
        self.lost_batches += 1
        log.warning(
            "sampler %d lost a batch (%s); re-sending weights and resampling", i, type(err).__name__
        )
        self.wait_for_sampler(i)

    def wait_for_sampler(self, i: int) -> None:
        """Re-send the newest weights to sampler i until it answers: Ray restarts it (at most
        SAMPLER_RESTARTS times), on another node if its own is gone and another has room. Waits
        at most `config.restart_wait_s`, saying every half minute what it waits for."""
        w, limit = self.wiring, self.config.restart_wait_s
        start = time.monotonic()
        ref = self.send_weights(self.samplers[i])
        while True:
            waited = time.monotonic() - start
            if waited > limit:
                raise RuntimeError(
                    f"sampler {i} did not come back within {limit:.0f}s: Ray restarts it at most "
                    f"{SAMPLER_RESTARTS} times, and only on a node with a free `sampler` resource "
                    "and the sampler's CPU/GPU; add such a node, then continue with: "
                    f"python -m learner.run --resume {self.run_dir}"
                )
            try:
                w.get(ref, timeout=min(30.0, max(limit - waited, 0.1)))
                return
            except w.timeout_errors:  # restarting, or waiting for a node with room
                log.warning(
                    "waiting for sampler %d to restart (%.0fs of %.0fs): it needs a node with a "
                    "free `sampler` resource and its CPU/GPU",
                    i,
                    time.monotonic() - start,
                    limit,
                )
            except w.actor_errors:  # died again, or the call reached it while it was down
                time.sleep(min(0.5 + waited / 4, 5.0))
                ref = self.send_weights(self.samplers[i])

    def sample_and_score(self, epoch: int) -> list[tuple[Any, list[str], dict[str, Any]]]:
        """Launch the epoch's sampler calls (every S-th batch to sampler S) and their rewards;
        reward actors read the images from the object store by ref, never through the driver."""
        prompts, seeds = epoch_schedule(self.config, epoch)
        b = self.config.sample.batch_size
        return [
            self.launch(
                i % len(self.samplers), prompts[i * b : (i + 1) * b], seeds[i * b : (i + 1) * b]
            )
            for i in range(self.config.sample.num_batches_per_epoch)
        ]

    def launch(self, i: int, prompts: list[str], seeds: np.ndarray) -> tuple:
        """One batch on sampler i, scored by every reward pool: (i, prompts, seeds, traj, refs)."""
        version = self.wiring.get(self.weights[0])
        traj, reward_input, _ = self.call_sampler(i, prompts, seeds, min_version=version)
        scores = {name: pool.score(reward_input) for name, pool in self.pools.items()}
        return (i, prompts, seeds, traj, scores)

    def collect(self, epoch: int, batches: list, samples_file: Any, bar: tqdm) -> Epoch:
        """Wait for the rewards; a batch with a non-finite reward is dropped and counted."""
        out = Epoch(per_term={name: [] for _, name in self.terms})
        for i, prompts, seeds, traj, refs in batches:
            while True:
                try:
                    results = {name: self.wiring.get(ref) for name, ref in refs.items()}
                    break
                except self.wiring.actor_errors + self.wiring.lost_errors as err:
                    # The sampler died with this batch, or its node with the images.
                    for name, ref in refs.items():
                        self.pools[name].done(ref)
                    self.recover_sampler(i, err)
                    i, prompts, seeds, traj, refs = self.launch(i, prompts, seeds)
            for name, ref in refs.items():
                self.pools[name].done(ref)
            bar.update(1)
            rewards, info = combine_rewards(self.terms, results)
            if not np.isfinite(rewards).all():
                self.bad_batch(f"epoch {epoch}", rewards, info)
                out.dropped += 1
                continue
            self.bad_in_row = 0
            out.trajs.append(traj)
            out.prompts.extend(prompts)
            out.rewards.append(rewards)
            for name, (term_rewards, _) in results.items():
                out.per_term[name].append(np.asarray(term_rewards, np.float32))
            for record in sample_records(prompts, rewards, info):
                samples_file.write(json.dumps({"epoch": epoch, **record}, default=float) + "\n")
        if not out.trajs:
            raise EmptyEpoch(f"epoch {epoch}: every batch was dropped")
        return out

    def bad_batch(self, where: str, rewards: np.ndarray, info: dict) -> None:
        """A batch with non-finite (or failed) rewards is dropped; many in a row stop the run."""
        self.bad_in_row += 1
        errors = {v for k, v in info.items() if k.endswith("/reward_error") and v}
        reason = "; ".join(sorted(map(str, errors))) or f"non-finite rewards {rewards}"
        log.warning("%s: dropping a batch (%s)", where, reason)
        if self.bad_in_row >= self.config.max_bad_batches:
            raise RewardBroken(
                f"{self.bad_in_row} batches in a row had non-finite or failed rewards (last: "
                f"{reason}); fix the reward model or service, then continue with: "
                f"python -m learner.run --resume {self.run_dir}"
            )

    def advantages(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        if self.config.stat_tracker.per_prompt:
            return self.tracker.update(prompts, rewards)
        return batch_advantages(rewards)

    def update(self, advantages: np.ndarray, rewards: np.ndarray, trajs: list) -> dict:
        try:
            return self.from_learner(
                self.wiring.call(self.learner, "update", advantages, rewards, *trajs)
            )
        except self.wiring.lost_errors as err:  # a node took trajectories with it
            raise BatchesLost(len(trajs)) from err

    # ----- checkpoints -----
    def save_checkpoint(self, epoch: int, **driver_state: Any) -> Path | None:
        """Checkpoint after `epoch` epochs (updates in async mode). A failed write (a full disk)
        keeps the previous checkpoint, says so and lets the run go on; the next save retries."""
        if not self.config.save_every:
            return None
        w = self.wiring
        tensors, learner_state = self.from_learner(w.call(self.learner, "state", num_returns=2))
        logs = {
            n: (self.run_dir / n).stat().st_size for n in RUN_LOGS if (self.run_dir / n).exists()
        }
        state = {
            "learner": learner_state,
            "driver": {
                "tracker": self.tracker.state_dict(),
                "lost_batches": self.lost_batches,
                "logs": logs,  # bytes of each log at this point; a resume cuts what follows
                **driver_state,
            },
            "config": dataclasses.asdict(self.config),
        }
        try:
            path = checkpoint.save(
                self.run_dir, epoch, tensors, state, self.history, self.config.keep_checkpoints
            )
        except OSError as err:
            log.error("checkpoint %d not written (%s); the previous one is kept", epoch, err)
            return None
        log.info("checkpoint %s", path)
        return path

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from `ckpt`: learner state, stat tracker, counters, and the run's logs cut back
        to what they held when it was written (so no epoch appears twice)."""
        w = self.wiring
        # Before anything changes: the tensors against the model, the log cuts against the run.
        problem = self.from_learner(
            w.call(self.learner, "check_state", ckpt.tensors, ckpt.state["learner"])
        )
        if problem:
            raise CheckpointError(f"checkpoint {ckpt.path}: {problem}")
        cuts = checked_log_cuts(self.run_dir, ckpt.state["driver"]["logs"])
        version = self.from_learner(
            w.call(self.learner, "load_state", ckpt.tensors, ckpt.state["learner"])
        )
        self.restored = ckpt.state["driver"]
        self.resumable = None  # until the epochs go on from the checkpoint
        self.write_config()
        self.tracker.load_state_dict(self.restored["tracker"])
        self.lost_batches = self.restored["lost_batches"]
        self.history = list(ckpt.metrics)
        self.start_epoch = ckpt.epoch
        with (self.run_dir / "metrics.jsonl").open("w") as f:
            f.writelines(json.dumps(m) + "\n" for m in ckpt.metrics)
        for path, size in cuts:
            with path.open("a") as f:
                f.truncate(size)
        log.info("resumed from %s: epoch %d, policy version %d", ckpt.path, ckpt.epoch, version)

    def replace_learner(self, err: LearnerLost) -> None:
        """--auto-resume: a new learner from the last checkpoint, or `err` if that is not on."""
        if not self.config.auto_resume or self.resumes >= MAX_AUTO_RESUMES:
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
        self.learner = self.make_learner()
        self.wait_started({"learner": self.learner})
        self.restore(ckpt)

    def grid(self, when: int | str, image: bool = True) -> dict:
        """Score the fixed prompts x seeds under the current weights (and save their image grid
        unless `image` is False): the same prompts and noise at every evaluation, so evaluations
        pair sample by sample. Appends {"when", "reward_mean", "rewards", "kl_base", ...} to
        RUN_DIR/eval.jsonl, with every sample's reward in grid order, and the same of the
        held-out prompts under "heldout"; returns it."""
        prompts, seeds = grid_schedule(self.config)
        traj, record = self.evaluate(prompts, seeds)
        if image:
            path = self.run_dir / grid_name(when)
            g = self.config.grid_seeds
            images = self.wiring.get(traj).images
            columns = [f"seed {s}" for s in seeds[:g]]
            save_grid(images, path, columns=g, row_labels=prompts[::g], column_labels=columns)
            if self.board:
                self.board.image("grid", path, step=when if isinstance(when, int) else 0)
        record = {"when": when} | record
        if self.config.heldout_prompts:
            _, record["heldout"] = self.evaluate(*grid_schedule(self.config, heldout=True))
            del record["heldout"]["policy_version"]
        with (self.run_dir / "eval.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.exporter.evaluation(record, record if when == "start" else read_evals(self.run_dir)[0])
        self.keep_best(record)
        self.check_guard(record)
        return record

    def keep_best(self, record: dict) -> None:
        """RUN_DIR/best/: the LoRA of the best evaluation so far (held-out prompts first, see
        `learner.guard`), with that evaluation in best/evaluation.json. The weights are the
        published ones, which the evaluation sampled with (in async mode a sampler may hold an
        older version; that evaluation is then not a candidate)."""
        score = evaluation_score(record)
        version, state = self.weights
        if score <= self.best_score or self.wiring.get(version) != record["policy_version"]:
            return
        self.best_score = score
        best = self.run_dir / "best"
        save_lora(self.wiring.get(state), best)
        summary = {k: record[k] for k in ("when", "policy_version", "reward_mean")}
        (best / "evaluation.json").write_text(json.dumps(summary | {"score": score}) + "\n")

    def check_guard(self, record: dict) -> None:
        """Compare the guard reward of this evaluation with the start's, paired; a fired guard
        warns, and with guard_action=stop makes the run end after this epoch."""
        if self.guard is None or record["when"] == "start":
            return
        start = read_evals(self.run_dir)[0]["guard"]["rewards"]
        reason = self.guard.verdict(start, record["guard"]["rewards"])
        if reason:
            log.warning("guard at %s: %s", record["when"], reason)
            if self.config.guard_action == "stop" and self.stop_reason is None:
                self.stop_reason = f"stopped at {record['when']} by the guard: {reason}"

    def evaluate(self, prompts: list[str], seeds: np.ndarray) -> tuple[Any, dict]:
        """Sample (prompt, seed) pairs on sampler 0 under the current weights and score them:
        the trajectory's ref, and the evaluation record without its "when"."""
        w = self.wiring
        traj, reward_input, meta = self.call_sampler(0, prompts, seeds, min_version=0, kl=True)
        refs = {name: pool.score(reward_input) for name, pool in self.pools.items()}
        results = {name: w.get(ref) for name, ref in refs.items()}
        for name, ref in refs.items():
            self.pools[name].done(ref)
        rewards, _ = combine_rewards(self.terms, results)
        guard = {}
        if self.guard_pool is not None:
            ref = self.guard_pool.score(reward_input)
            scores = np.asarray(w.get(ref)[0], np.float64)
            self.guard_pool.done(ref)
            guard = {"guard": {"reward": self.guard_pool.name, "reward_mean": float(scores.mean())}}
            guard["guard"]["rewards"] = [round(float(r), 6) for r in scores]
        meta = w.get(meta)
        return traj, guard | {
            "policy_version": meta["policy_version"],
            "reward_mean": float(np.mean(rewards)),
            "reward_std": float(np.std(rewards)),
            "samples": len(rewards),
            "rewards": [round(float(r), 6) for r in rewards],
            # Per-step KL of the policy to the base model on these trajectories (LoRA off).
            "kl_base": float(np.mean(meta["kl_base"])),
        }

    def resize_rewards(self) -> None:
        """Autoscale each reward pool, and apply sizes asked for in RUN_DIR/control.json
        ({"reward_workers": {"aesthetic": 4}}) when that file changes."""
        control = self.run_dir / "control.json"
        if control.exists() and control.stat().st_mtime != self._control_mtime:
            self._control_mtime = control.stat().st_mtime
            try:
                wanted = json.loads(control.read_text()).get("reward_workers", {})
                for name, n in wanted.items():
                    if name not in self.pools:
                        raise ValueError(f"no reward pool {name!r}; pools: {sorted(self.pools)}")
                    got = self.pools[name].resize(int(n))
                    log.info("control.json: reward pool %s -> %d (asked %s)", name, got, n)
            except (ValueError, TypeError, AttributeError) as err:
                log.warning("ignoring %s: %s", control, err)
        for pool in self.pools.values():
            pool.autoscale()

    def reward_busy(self) -> dict[str, float]:
        """Busy fraction of each reward pool (mean over its actors' `stats()`). An actor that is
        not up yet (a pool grown past what the cluster holds now) is left out, not waited for."""
        w, busy = self.wiring, {}
        for name, pool in self.pools.items():
            stats = w.get_ready([w.call(actor, "stats") for actor in pool.actors], timeout=1.0)
            key = f"reward/{name}/busy_fraction"
            if stats:
                busy[key] = float(np.mean([s[key] for s in stats]))
        return busy

    def log(self, record: dict, metrics_file: Any) -> None:
        record.update({f"reward_workers/{n}": len(p) for n, p in self.pools.items()})
        record.update(self.reward_busy())
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        self.exporter.update(record)
        if self.board:
            self.board.scalars(record, record["epoch"])
        print(format_record(record), flush=True)
        self.beat.touch()

    # ----- the loop -----
    def run(self) -> list[dict]:
        """Run `config.epochs` sync DDPO epochs; return the per-epoch metrics."""
        try:
            with self.beat.phase("starting the actors"):
                self.wait_started(self.actors())
            if self.config.mode == "async":
                if not isinstance(self.wiring, OnRay):
                    raise ValueError("--mode async runs on Ray only; drop --in-process")
                with self.beat.phase("training (async)"):
                    return run_async(self)
            return self._run()
        except KeyboardInterrupt:
            self.save_interrupted()
            raise
        finally:
            self.exporter.close()
            self.beat.close()
            if self.board:
                self.board.close()
            if (self.run_dir / "metrics.jsonl").exists():
                write_report(self.run_dir)
            self.shutdown()

    def actors(self) -> dict[str, Any]:
        """The run's actors by name: samplers, the learner, every reward pool's actors."""
        actors = {f"sampler {i}": s for i, s in enumerate(self.samplers)}
        actors["learner"] = self.learner
        pools = list(self.pools.values()) + ([self.guard_pool] if self.guard_pool else [])
        for pool in pools:
            actors |= {f"reward actor {pool.name} {i}": a for i, a in enumerate(pool.actors)}
        return actors

    def wait_started(self, actors: dict[str, Any]) -> None:
        """Wait for these actors to start, saying what holds them back (`learner.pending`)."""
        c = self.config
        self.wiring.wait_started(actors, c.pending_report_s, c.pending_timeout_s)

    def shutdown(self) -> None:
        """End the run's actors (they would outlive a failed run on a shared cluster)."""
        for actor in self.actors().values():
            try:
                self.wiring.kill(actor)
            except Exception as err:  # already gone
                log.debug("kill %s: %s", actor, err)

    def begin(self) -> int:
        """Restore the checkpoint to resume from, or start fresh: the start grid, checkpoint 0
        (so that even the first epochs can be resumed). Publishes the weights; returns the
        version."""
        if self.resume_from is not None:
            self.restore(self.resume_from)
            return self.publish()
        self.write_config()
        for name in ("metrics.jsonl", *RUN_LOGS):  # an attempt that stopped before checkpoint 0
            (self.run_dir / name).write_text("")
        version = self.publish()
        with self.beat.phase("the start evaluation"):
            self.grid("start")
        self.save_checkpoint(0)
        return version

    def write_config(self) -> None:
        (self.run_dir / "config.json").write_text(
            json.dumps(dataclasses.asdict(self.config), indent=2, default=str)
        )

    def save_interrupted(self) -> None:
        """After Ctrl-C: checkpoint the epochs done, unless one is already saved or the learner
        was inside an update (sync mode; an async run goes on from its last checkpoint). The
        unfinished epoch's samples are cut from samples.jsonl first."""
        if self.resumable is None or not self.config.save_every:
            return
        (done, logged), self.resumable = self.resumable, None
        path = checkpoint.checkpoint_dir(self.run_dir) / f"epoch-{done:06d}"
        if path.is_dir() and checkpoint.verify(path) is None:
            return
        with (self.run_dir / "samples.jsonl").open("a") as f:
            f.truncate(logged)
        self.save_checkpoint(done)

    def finish(self) -> None:
        """The trained LoRA (diffusers format) and the end grid."""
        self.publish()
        _, state = self.wiring.call(self.learner, "weights", num_returns=2)
        save_lora(self.wiring.get(state), self.run_dir / "lora")
        with self.beat.phase("the end evaluation"):
            self.grid("end")

    def _run(self) -> list[dict]:
        self.begin()
        while True:
            try:
                self._epochs()
                break
            except LearnerLost as err:
                self.replace_learner(err)  # raises unless --auto-resume
                self.publish()
        self.finish()
        return self.history

    def _epochs(self) -> None:
        with (
            (self.run_dir / "metrics.jsonl").open("a") as metrics_file,
            (self.run_dir / "samples.jsonl").open("a") as samples_file,
        ):
            self.resumable = (self.start_epoch, samples_file.tell())
            for epoch in range(self.start_epoch, self.config.epochs):
                with self.beat.phase(f"epoch {epoch}"):
                    record = self.epoch_with_retry(epoch, samples_file)
                self.history.append(record)
                self.log(record, metrics_file)
                samples_file.flush()
                self.resumable = (epoch + 1, samples_file.tell())
                self.evaluate_due(epoch + 1)
                if self.checkpoint_due(epoch + 1) or self.stop_reason:
                    self.save_checkpoint(epoch + 1)
                if self.stop_reason:
                    log.warning("%s", self.stop_reason)
                    break

    def epoch_with_retry(self, epoch: int, samples_file: Any) -> dict:
        """One epoch; if a lost node took trajectories with it before the update read them, the
        epoch is run again from its start (the learner has not changed)."""
        tracker, logged = self.tracker.state_dict(), samples_file.tell()
        losses = 0
        while True:
            try:
                return self.epoch(epoch, samples_file)
            except EmptyEpoch as err:  # a run of bad rewards; too long a run stops in bad_batch
                log.warning("%s; sampling it again", err)
            except BatchesLost as err:
                losses += 1
                if losses > SAMPLER_RESTARTS:
                    raise RuntimeError(f"epoch {epoch}: trajectories lost {losses} times") from err
                self.lost_batches += err.batches
                self.tracker.load_state_dict(tracker)
                samples_file.truncate(logged)
                log.warning("epoch %d: %s lost with a node; running the epoch again", epoch, err)

    def epoch(self, epoch: int, samples_file: Any) -> dict:
        """Publish, sample, score, advantages, update: one sync DDPO epoch; its metrics, with
        the wall time of each phase (`seconds/<phase>`)."""
        clock = [time.time()]

        def lap() -> float:
            clock.append(time.time())
            return round(clock[-1] - clock[-2], 3)

        self.resize_rewards()
        version = self.publish()
        t_publish = lap()
        # One bar per epoch: a step per sampled-and-scored batch, then the update.
        bar = tqdm(
            total=len(batches := self.sample_and_score(epoch)) + 1,
            desc=f"epoch {epoch} sample+score",
            leave=False,
            disable=None,
        )
        got = self.collect(epoch, batches, samples_file, bar)
        t_sample_score = lap()
        rewards = np.concatenate(got.rewards)
        self.resumable = None  # the stat tracker and the learner move on from here
        advantages = self.advantages(got.prompts, rewards)
        bar.set_description(f"epoch {epoch} train")
        update = self.update(advantages, rewards, got.trajs)
        t_update = lap()
        bar.update(1)
        bar.close()
        record = {
            "epoch": epoch,
            "policy_version": version,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            **{k: update.get(k) for k in UPDATE_METRICS},
            **{k: v for k, v in update.items() if k.startswith("threads/")},
            "samples": int(len(rewards)),
            "batches_dropped": got.dropped,
            "batches_lost_total": self.lost_batches,
            "seconds": round(clock[-1] - clock[0], 3),
            "seconds/publish": t_publish,
            "seconds/sample_score": t_sample_score,
            "seconds/update": t_update,
        }
        if len(self.terms) > 1:
            for name, parts in got.per_term.items():
                record[f"reward/{name}/mean"] = float(np.concatenate(parts).mean())
                record[f"reward/{name}/std"] = float(np.concatenate(parts).std())
        return record

    def evaluate_due(self, done: int) -> None:
        """After `done` epochs/updates (not the last: `finish` evaluates that): a grid every
        grid_every, a scored evaluation every eval_every."""
        if done == self.config.epochs:
            return
        grid_every, eval_every = self.config.grid_every, self.config.eval_every
        image = bool(grid_every) and done % grid_every == 0
        if image or (eval_every and done % eval_every == 0):
            if self.config.mode == "sync":  # evaluate the weights just trained, not the last sent
                self.publish()
            with self.beat.phase(f"the evaluation after {done}"):
                self.grid(done, image=image)

    def checkpoint_due(self, done: int) -> bool:
        """After `done` epochs/updates: every save_every, and at the end."""
        every = self.config.save_every
        return bool(every) and (done % every == 0 or done == self.config.epochs)


@dataclass
class Epoch:
    """What one epoch's scoring kept, in sample order."""

    trajs: list = field(default_factory=list)  # Trajectory batches or their refs
    prompts: list[str] = field(default_factory=list)
    rewards: list[np.ndarray] = field(default_factory=list)
    per_term: dict[str, list[np.ndarray]] = field(default_factory=dict)
    dropped: int = 0


def train(
    config: Config, wiring: InProcess | OnRay | None = None, resume: Checkpoint | None = None
) -> list[dict]:
    """Run `config.epochs` DDPO epochs (from `resume` if given); return the per-epoch metrics,
    those before the checkpoint included."""
    return Driver(config, wiring, resume).run()
