"""The fleet: a run's actors and what the drivers ask of them.

A `Fleet` owns the wiring (Ray or one process), the sampler actors, the learner handle and the
reward pools (the guard's included). It publishes weights, launches samples and their scores,
collects the scores, calls the learner, recovers a lost sampler or learner, resizes the pools
and, as a context manager, ends every actor it started. The drivers (`learner.driver`,
`learner.async_driver`) say what to do; the fleet knows how, on Ray or in one process.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from actors.reward import RewardWorker
from actors.sampler import Sampler
from ddpo.config import Config
from ddpo.pools import PoolSize
from ddpo.threads import role_threads
from learner.errors import BatchesLost
from learner.group import GroupCall, LearnerGroup, merged_metrics
from learner.learner import Learner
from learner.reward_pool import RewardPool
from learner.wiring import OnRay, Wiring
from rewards import parse_reward_options, parse_reward_spec, parse_reward_urls, reward_options

log = logging.getLogger(__name__)

# ----- placement: where each role's actors go, one table for every role -----
RESTARTS = 3
"""How often Ray restarts a lost actor. A sampler restarts with no weights: the driver re-sends
the newest before its next batch and samples the lost batch again. A reward actor's score calls
in flight are sent again by Ray (scoring is idempotent: no state but counters)."""

ROLE_SHARE = 0.001
"""Each actor asks this much of its role resource (`sampler`, `learner`, `reward_<name>`): the
resource says which node type may host it, the CPU/GPU request how many fit on one node."""

GPUS = {"sampler": 1, "learner": 1, "reward_aesthetic": 0.25, "reward_alignment": 1.0}
"""GPUs per actor of each role on a GPU run (other rewards run on CPU). Aesthetic: CLIP
ViT-L/14 (428M params, 1.7 GB fp32) + the MLP; alignment: LLaVA-1.5-7B in fp16 (~14 GB; 13B
~26 GB) + DeBERTa-xlarge-MNLI (750M params, 3 GB fp32) and activations: one 80 GB GPU holds it
with room for batch 16."""


def role_options(
    role: str, gpu: bool, weights_group: bool = False, takes_turns: bool = False
) -> dict[str, Any]:
    """Ray options of a sampler or learner actor: its role resource, and one GPU on GPU runs.

    weights_group (async samplers): a `weights` concurrency group, so that new weights arrive
    during a long sample call. Without it (sync) every method runs on the actor's main thread,
    which matters on CPU: torch's OpenMP threads started from a pool thread ran the tiny model
    2.2x slower than from the main thread (bench/overhead.py, BENCHMARKS.md).

    takes_turns (the sync learner): it trains only while the samplers wait, so it asks for no
    CPU of its own: on one machine it uses theirs (2 cores hold a sampler, a reward actor and
    the learner). In async mode it trains beside them and asks for one."""
    cpus = 0 if takes_turns else 1
    options = {
        "num_cpus": cpus,
        "num_gpus": GPUS[role] if gpu else 0,
        "resources": {role: ROLE_SHARE},
    }
    if role == "sampler" and weights_group:
        options["concurrency_groups"] = {"weights": 1}
    if role == "sampler":
        options["max_restarts"] = RESTARTS
    return options


def reward_actor_options(
    name: str, gpu: bool = False, role_resource: bool = True, max_concurrency: int = 4
) -> dict[str, Any]:
    """Ray options for one actor of reward `name` (one term of a spec): CPU, GPU share, role
    resource `reward_<name>` (the local `ray.init` must declare it, see `local_role_resources`)
    and a thread pool so that concurrent calls can be batched. A reward actor that dies (OOM,
    node lost) restarts and Ray re-sends its calls in flight, so the driver never loses a batch
    to one; exceptions raised by `score` are not retried (retry_exceptions stays off)."""
    role = f"reward_{name}"
    options: dict[str, Any] = {
        "num_cpus": 1,
        "max_concurrency": max_concurrency,
        "max_restarts": RESTARTS,
        "max_task_retries": RESTARTS,
    }
    if gpu and role in GPUS:
        options["num_gpus"] = GPUS[role]
    if role_resource:
        options["resources"] = {role: ROLE_SHARE}
    return options


def local_role_resources(spec: str) -> dict[str, float]:
    """The role resources a local `ray.init(resources=...)` must offer for the actors of `spec`."""
    return {f"reward_{name}": 1.0 for _, name in parse_reward_spec(spec)}


class Fleet:
    """Samplers, the learner and one reward pool per reward (and the guard's), on `wiring`."""

    def __init__(
        self, config: Config, wiring: Wiring | None, run_name: str, guard: str | None = None
    ):
        self.config = config
        self.run_dir = Path(config.run.dir or "runs/run")
        self.terms = parse_reward_spec(config.reward)
        trained = [name for _, name in self.terms]
        # Every reward scored: the trained ones, and the guard's, on evaluations only.
        scored = config.reward + (f"+0*{guard}" if guard else "")
        options = reward_options(
            scored, parse_reward_options(config.reward_options), tiny=config.model == "tiny"
        )
        sizes = config.system.pool_sizes
        self.wiring: Wiring = wiring or OnRay(
            config.run.address,
            min_cpus=config.system.num_samplers
            + sum(sizes.get(n, PoolSize()).max for n in trained)
            + config.system.num_learners
            + bool(guard),
            resources={"sampler": config.system.num_samplers, "learner": 1}
            | local_role_resources(scored),
        )
        # Sync mode: samplers run together, then the learner alone; async: all at once. Split
        # the cores so that torch never runs more threads than there are cores.
        threads = os.cpu_count() or 1
        is_async = config.system.mode == "async"
        learners = config.system.num_learners
        busy_together = config.system.num_samplers + is_async * learners
        sampler_threads, adaptive = role_threads(max(1, threads // busy_together))
        learner_threads, _ = role_threads(
            sampler_threads if is_async else max(1, threads // learners)
        )
        gpu = config.system.device.startswith("cuda")
        create = self.wiring.create
        sampler_options = role_options("sampler", gpu, weights_group=is_async)
        self.samplers = [
            create(Sampler, config, i, sampler_threads, adaptive, options=sampler_options)
            for i in range(config.system.num_samplers)
        ]

        urls = parse_reward_urls(config.system.reward_urls, config.reward)  # served outside

        def pool(name: str) -> RewardPool:
            w, placement = self.wiring, reward_actor_options(name, gpu=gpu)
            return RewardPool(
                name,
                sizes.get(name, PoolSize()),
                make_actor=lambda: create(
                    RewardWorker, name, options[name], run_name, urls.get(name), options=placement
                ),
                call=lambda actor, reward_input: w.call(actor, "score", reward_input),
                kill=lambda actor: w.kill(actor),
            )

        self.pools = {name: pool(name) for name in trained}
        self.guard_pool = pool(guard) if guard else None
        learner_options = role_options("learner", gpu, takes_turns=not is_async)
        if config.system.num_learners > 1:  # a placement group's bundle cannot be empty
            learner_options["num_cpus"] = learner_options["num_cpus"] or ROLE_SHARE
        bundle = {"CPU": learner_options["num_cpus"], "GPU": learner_options["num_gpus"]}
        self.learners = LearnerGroup(
            self.wiring,
            lambda placement: create(
                Learner, config, learner_threads, None, adaptive,
                options=learner_options | placement,
            ),
            config.system.num_learners,
            bundle | learner_options["resources"],
            config.system.learner_placement,
            self.run_dir,
        )  # fmt: skip
        self.weights: tuple[Any, Any] = (None, None)  # refs of the published (version, state)
        # Counts learners replaced from a checkpoint: their versions start again below what the
        # samplers may still hold queued, so samplers order weights by (generation, version).
        self.generation = 0
        self.lost_batches = 0  # batches lost with a sampler and sampled again
        self._control_mtime = 0.0

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def learner(self) -> Any:
        """The learner actor (rank 0 of a group): it publishes weights and writes checkpoints."""
        return self.learners.lead

    # ----- weights and the learner -----
    def publish(self) -> int:
        """One object-store copy of the CPU LoRA state dict; every sampler gets its ref. Only the
        newest ref is kept (the previous version's object is freed once samplers drop it)."""
        w = self.wiring
        self.weights = self.learners.call("weights", num_returns=2)  # (version, state) refs
        version = self.from_learner(self.weights[0])
        sent = [self.send_weights(s) for s in self.samplers]
        for i, ref in enumerate(sent):
            try:
                w.get(ref, timeout=30.0)
            except w.actor_errors + w.timeout_errors:  # restarting: weights once it is back
                self.wait_for_sampler(i)
        return version

    def lora(self) -> dict:
        """The learner's LoRA state dict (CPU tensors), fetched from the learner."""
        _, state = self.learners.call("weights", num_returns=2)
        return self.wiring.get(state)

    def from_learner(self, ref: Any) -> Any:
        """The result of a call to the learner (rank 0); its death becomes `LearnerLost`."""
        return self.learners.result(ref)

    def ask_learner(self, method: str, *args: Any, num_returns: int = 1) -> Any:
        """Call a method of the learner (rank 0) and wait for its result (`LearnerLost` if it
        died): one that changes nothing, as weights, state and check_state."""
        return self.learners.ask(method, *args, num_returns=num_returns)

    def tell_learners(self, method: str, *args: Any) -> Any:
        """Call a method on every learner rank and wait (`LearnerLost` if one died): one that
        changes their state alike, as load_state. Rank 0's result."""
        return self.learners.ask_all(method, *args)

    def start_update(self, advantages: np.ndarray, rewards: np.ndarray, trajs: list) -> GroupCall:
        """Start one update on every learner rank on these trajectory batches (refs: each rank
        fetches them itself); `update_done` takes the ranks' results."""
        return self.learners.call_all("update", advantages, rewards, *trajs)

    def update_done(self, call: GroupCall, ready: list[int]) -> dict | None:
        """Take the ranks' results at positions `ready` of `call.waiting`; once every rank has
        answered, the update's metrics (else None). `LearnerLost` if a rank died, `BatchesLost`
        if a node took trajectories with it."""
        try:
            if not self.learners.poll(call, ready):
                return None
        except self.wiring.lost_errors as err:
            raise BatchesLost(len(call.refs)) from err
        return merged_metrics([call.results[i] for i in range(len(call.refs))])

    def update(self, advantages: np.ndarray, rewards: np.ndarray, trajs: list) -> dict:
        """One update of every learner rank, waited for: its metrics."""
        call = self.start_update(advantages, rewards, trajs)
        while True:
            metrics = self.update_done(call, self.wiring.wait(call.waiting))
            if metrics is not None:
                return metrics

    def replace_learner(self) -> None:
        """New learner actors in place of a lost group (they start from their initial state)."""
        self.learners.restart()
        self.wait_started(self.learners.named())
        self.generation += 1

    # ----- samplers -----
    def send_weights(self, sampler: Any) -> Any:
        version, state = self.weights
        group = "weights" if self.config.system.mode == "async" else None  # see role_options
        return self.wiring.call(
            sampler, "set_weights", version, state, self.generation, group=group
        )

    def call_sampler(
        self, i: int, prompts: list[str], seeds: np.ndarray, min_version: int, kl: bool = False
    ) -> Any:
        """Start sampler i on one batch: (trajectory, reward input, meta) refs. A sampler that
        died and restarted has no weights: `min_version` makes it refuse to sample with them.
        With `kl` the meta also holds each sample's KL to the base model."""
        w = self.wiring
        return w.call(self.samplers[i], "sample", prompts, seeds, min_version, kl, num_returns=3)

    def launch(self, i: int, prompts: list[str], seeds: np.ndarray) -> tuple:
        """One batch on sampler i with the published weights, scored by every reward pool:
        (i, prompts, seeds, traj, score refs). Reward actors read the images from the object
        store by ref, never through the driver."""
        version = self.wiring.get(self.weights[0])
        traj, reward_input, _ = self.call_sampler(i, prompts, seeds, min_version=version)
        scores = {name: pool.score(reward_input) for name, pool in self.pools.items()}
        return (i, prompts, seeds, traj, scores)

    def collect(self, batch: tuple) -> tuple[tuple, dict[str, Any]]:
        """Wait for a launched batch's scores: (the batch, {reward: (rewards, info)}). A batch
        lost with its sampler, or with the node holding its images, is sampled again."""
        while True:
            i, prompts, seeds, _, refs = batch
            try:
                results = {name: self.wiring.get(ref) for name, ref in refs.items()}
                self.release(refs)
                return batch, results
            except self.wiring.actor_errors + self.wiring.lost_errors as err:
                self.release(refs)
                self.recover_sampler(i, err)
                batch = self.launch(i, prompts, seeds)

    def release(self, refs: dict[str, Any]) -> None:
        """Tell each pool that its score call has ended (answered or lost)."""
        for name, ref in refs.items():
            self.pools[name].done(ref)

    def recover_sampler(self, i: int, err: BaseException) -> None:
        """After a sampler call failed with its actor: wait for the restart, re-send weights."""
        self.lost_batches += 1
        log.warning(
            "sampler %d lost a batch (%s); re-sending weights and resampling", i, type(err).__name__
        )
        self.wait_for_sampler(i)

    def wait_for_sampler(self, i: int) -> None:
        """Re-send the newest weights to sampler i until it answers: Ray restarts it (at most
        RESTARTS times), on another node if its own is gone and another has room. Waits
        at most `config.system.restart_wait_s`, saying every half minute what it waits for."""
        w, limit = self.wiring, self.config.system.restart_wait_s
        start = time.monotonic()
        ref = self.send_weights(self.samplers[i])
        while True:
            waited = time.monotonic() - start
            if waited > limit:
                raise RuntimeError(
                    f"sampler {i} did not come back within {limit:.0f}s: Ray restarts it at most "
                    f"{RESTARTS} times, and only on a node with a free `sampler` resource "
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

    # ----- reward pools -----
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

    def pool_metrics(self) -> dict[str, float]:
        """What every metrics record says of the pools: their sizes and busy fractions."""
        return {f"reward_workers/{n}": len(p) for n, p in self.pools.items()} | self.reward_busy()

    # ----- lifecycle -----
    def actors(self) -> dict[str, Any]:
        """The run's actors by name: samplers, the learner, every reward pool's actors."""
        actors = {f"sampler {i}": s for i, s in enumerate(self.samplers)}
        actors |= self.learners.named()
        pools = list(self.pools.values()) + ([self.guard_pool] if self.guard_pool else [])
        for pool in pools:
            actors |= {f"reward actor {pool.name} {i}": a for i, a in enumerate(pool.actors)}
        return actors

    def wait_started(self, actors: dict[str, Any] | None = None) -> None:
        """Wait for these actors (default: all) to start, saying what holds them back
        (`learner.pending`)."""
        run = self.config.run
        self.wiring.wait_started(
            self.actors() if actors is None else actors, run.pending_report_s, run.pending_timeout_s
        )

    def shutdown(self) -> None:
        """End the run's actors (they would outlive a failed run on a shared cluster)."""
        for actor in self.actors().values():
            try:
                self.wiring.kill(actor)
            except Exception as err:  # already gone
                log.debug("kill %s: %s", actor, err)
        self.learners.stop()
