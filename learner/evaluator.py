"""Evaluations: fixed prompts and seeds scored under the current weights, the same at every
evaluation so that evaluations pair sample by sample; image grids of them; the best
evaluation's LoRA kept in RUN_DIR/best/; the over-optimization guard checked (`learner.guard`).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np

from ddpo.config import Config
from ddpo.images import save_grid
from ddpo.lora import save_lora
from learner.errors import RewardBroken
from learner.evaluation import read_evals
from learner.fleet import Fleet
from learner.guard import Guard, evaluation_score
from learner.report import grid_name
from learner.runlog import RunLog
from learner.scoring import reward_errors
from rewards import combine_rewards

log = logging.getLogger(__name__)


def grid_schedule(config: Config, heldout: bool = False) -> tuple[list[str], np.ndarray]:
    """Fixed prompts and seeds for the image grids and evaluations (of the training prompts, or
    of the held-out ones)."""
    prompts = list((config.heldout_prompts if heldout else config.prompts)[: config.grid_prompts])
    rows = [p for p in prompts for _ in range(config.grid_seeds)]
    seeds = np.tile(np.arange(config.grid_seeds, dtype=np.int64) + 10_000, len(prompts))
    return rows, seeds


class Evaluator:
    """Scores evaluations on sampler 0 of `fleet` and logs them to `runlog`."""

    def __init__(self, config: Config, fleet: Fleet, runlog: RunLog, guard: Guard | None):
        self.config, self.fleet, self.runlog, self.guard = config, fleet, runlog, guard
        self.run_dir = runlog.run_dir
        self.stop_reason: str | None = None  # set by a fired guard: the run ends early
        best = self.run_dir / "best" / "evaluation.json"  # a resumed run's best so far
        self.best_score = json.loads(best.read_text())["score"] if best.is_file() else -math.inf

    def grid(self, when: int | str, image: bool = True) -> dict | None:
        """Score the fixed prompts x seeds under the current weights (and save their image grid
        unless `image` is False): the same prompts and noise at every evaluation, so evaluations
        pair sample by sample. Appends {"when", "reward_mean", "rewards", "kl_base", ...} to
        RUN_DIR/eval.jsonl, with every sample's reward in grid order, and the same of the
        held-out prompts under "heldout"; returns it. An evaluation with a reward that is not
        finite (scored twice) is not recorded: see `refuse`."""
        prompts, seeds = grid_schedule(self.config)
        traj, record, problem = self.evaluate(prompts, seeds)
        if self.config.heldout_prompts:
            _, heldout, heldout_problem = self.evaluate(*grid_schedule(self.config, True))
            del heldout["policy_version"]
            record["heldout"] = heldout
            if heldout_problem:
                held_out = f"held-out prompts: {heldout_problem}"
                problem = f"{problem}; {held_out}" if problem else held_out
        if problem:
            self.refuse(when, problem)
            return None
        if image:
            path = self.run_dir / grid_name(when)
            g = self.config.grid_seeds
            images = self.fleet.wiring.get(traj).images
            columns = [f"seed {s}" for s in seeds[:g]]
            save_grid(images, path, columns=g, row_labels=prompts[::g], column_labels=columns)
            self.runlog.image("grid", path, step=when if isinstance(when, int) else 0)
        record = {"when": when} | record
        self.runlog.evaluation(record)
        self.keep_best(record)
        self.check_guard(record)
        return record

    def refuse(self, when: int | str, problem: str) -> None:
        """An evaluation whose rewards are not all finite pairs with nothing. The start and the
        end are what a run's result is, so without them the run stops (`RewardBroken`); one
        in between is skipped with a warning, and the run goes on."""
        if when == "start":
            raise RewardBroken(
                f"the start evaluation: {problem}; nothing was trained. Fix the reward model or "
                f"service, then start the run again with another --run-dir (or remove "
                f"{self.run_dir})"
            )
        if when == "end":
            raise RewardBroken(
                f"the end evaluation: {problem}; the trained weights are saved. Fix the reward "
                f"model or service, then evaluate them with: python -m learner.run --resume "
                f"{self.run_dir}"
            )
        log.warning("the evaluation after %s is not recorded: %s", when, problem)

    def keep_best(self, record: dict) -> None:
        """RUN_DIR/best/: the LoRA of the best evaluation so far (held-out prompts first, see
        `learner.guard`), with that evaluation in best/evaluation.json. The weights are the
        published ones, which the evaluation sampled with (in async mode a sampler may hold an
        older version; that evaluation is then not a candidate)."""
        score = evaluation_score(record)
        version, state = self.fleet.weights
        get = self.fleet.wiring.get
        if score <= self.best_score or get(version) != record["policy_version"]:
            return
        self.best_score = score
        best = self.run_dir / "best"
        save_lora(get(state), best)
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

    def evaluate(self, prompts: list[str], seeds: np.ndarray) -> tuple[Any, dict, str | None]:
        """Sample (prompt, seed) pairs on sampler 0 under the current weights and score them:
        the trajectory's ref, the evaluation record without its "when", and what is wrong with
        its rewards if they are not all finite (then the record is not to be kept)."""
        fleet, get = self.fleet, self.fleet.wiring.get
        traj, reward_input, meta = fleet.call_sampler(0, prompts, seeds, min_version=0, kl=True)
        for _ in range(2):  # a reward that failed (NaN) is asked once more, as a service may
            refs = {name: pool.score(reward_input) for name, pool in fleet.pools.items()}
            results = {name: get(ref) for name, ref in refs.items()}
            fleet.release(refs)
            rewards, info = combine_rewards(fleet.terms, results)
            failed = int((~np.isfinite(rewards)).sum())
            if not failed:
                break
        problems = []
        if failed:
            reason = reward_errors(info) or "not finite"
            problems.append(f"{failed} of {len(rewards)} rewards failed ({reason})")
        guard = {}
        if fleet.guard_pool is not None:
            ref = fleet.guard_pool.score(reward_input)
            scores = np.asarray(get(ref)[0], np.float64)
            fleet.guard_pool.done(ref)
            name = fleet.guard_pool.name
            failed_scores = int((~np.isfinite(scores)).sum())
            if failed_scores:
                problems.append(f"{failed_scores} of {len(scores)} {name} guard scores failed")
            rounded = [round(float(r), 6) for r in scores]
            guard = {
                "guard": {"reward": name, "reward_mean": float(scores.mean()), "rewards": rounded}
            }
        meta = get(meta)
        if problems:  # nothing of it is kept: see `grid`
            return traj, {"policy_version": meta["policy_version"]}, " and ".join(problems)
        record = guard | {
            "policy_version": meta["policy_version"],
            "reward_mean": float(np.mean(rewards)),
            "reward_std": float(np.std(rewards)),
            "samples": len(rewards),
            "rewards": [round(float(r), 6) for r in rewards],
            # Per-step KL of the policy to the base model on these trajectories (LoRA off).
            "kl_base": float(np.mean(meta["kl_base"])),
        }
        return traj, record, None
