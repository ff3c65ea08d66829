"""The learner's actors: one, or a data-parallel group of `num_learners` in one placement group.

    group = LearnerGroup(wiring, make_rank, n, bundle, strategy, run_dir)
    group.ask("weights", num_returns=2)                       # rank 0 alone: weights, state
    metrics = group.gather(group.call_all("update", ...))     # every rank; rank 0's result

Rank 0 publishes the weights and writes the checkpoint (`ask`); what changes a learner's state
(`update`, `load_state`) goes to every rank (`call_all`), each rank fetching the trajectories by
their refs itself. The ranks train together (`learner.distributed`), so a group stays up only
while its ranks stay in step: a lost rank stops the whole group with `LearnerLost`, as a lost
learner did alone, and so does a call that some ranks ended and others did not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from learner.errors import LearnerLost
from learner.wiring import Wiring

log = logging.getLogger(__name__)

GRACE_S = 10.0
"""After one rank's call raised, how long the other ranks have to end theirs (they raise the
same error, or wait in a collective for the rank that raised)."""


class GroupCall:
    """One method called on every rank: the refs still running, and each rank's result."""

    def __init__(self, refs: list):
        self.refs = list(refs)  # rank -> ref
        self.pending = list(range(len(refs)))  # the ranks still running
        self.results: dict[int, Any] = {}  # rank -> result

    @property
    def waiting(self) -> list:
        """The refs of the ranks still running, in rank order."""
        return [self.refs[i] for i in self.pending]

    @property
    def done(self) -> bool:
        return not self.pending


class LearnerGroup:
    """The learner actors of a run, and how a call reaches them."""

    def __init__(
        self,
        wiring: Wiring,
        make_rank: Callable[[dict], Any],
        size: int,
        bundle: dict[str, float],
        strategy: str,
        run_dir: Path,
    ):
        """make_rank(extra_options) creates one learner actor; `bundle` is what each asks for
        (a placement group reserves `size` of them with `strategy` when size > 1)."""
        self.wiring, self.make_rank, self.size = wiring, make_rank, size
        self.bundle, self.strategy, self.run_dir = bundle, strategy, run_dir
        self.placement: Any = None
        self.ranks: list[Any] = []
        self.joining: GroupCall | None = None  # the ranks' join_group calls, until they return
        self.start()

    def start(self) -> None:
        """Create the ranks and start their rendezvous; `ready` waits for it. One learner is a
        plain actor, as before groups existed."""
        if self.size == 1:
            self.ranks = [self.make_rank({})]
            return
        w = self.wiring
        bundles = [{k: v for k, v in self.bundle.items() if v} for _ in range(self.size)]
        self.placement, options = w.placement_group(bundles, self.strategy)
        self.ranks = [self.make_rank(o) for o in options]
        # Rank 0 names the address; the ranks receive its ref and meet there (Ray passes the
        # value once rank 0 has answered, so the driver never waits here).
        address = w.call(self.ranks[0], "rendezvous")
        self.joining = GroupCall(
            [w.call(r, "join_group", i, self.size, address) for i, r in enumerate(self.ranks)]
        )

    @property
    def lead(self) -> Any:
        """Rank 0: it publishes the weights and writes the checkpoints."""
        return self.ranks[0]

    def named(self) -> dict[str, Any]:
        """The ranks by name ("learner" alone; "learner 0", "learner 1", ... in a group)."""
        if self.size == 1:
            return {"learner": self.lead}
        return {f"learner {i}": r for i, r in enumerate(self.ranks)}

    def ready(self) -> None:
        """Wait until every rank has joined the process group (once, after `start`)."""
        if self.joining is not None:
            self.gather(self.joining)
            self.joining = None

    # ----- calls -----
    def ask(self, method: str, *args: Any, num_returns: int = 1) -> Any:
        """Call a method of rank 0 and wait for its result."""
        return self.result(self.call(method, *args, num_returns=num_returns))

    def call(self, method: str, *args: Any, num_returns: int = 1) -> Any:
        """Start a method of rank 0 (one that changes no state: weights, state, check_state)."""
        self.ready()
        return self.wiring.call(self.lead, method, *args, num_returns=num_returns)

    def result(self, ref: Any) -> Any:
        """The result of a rank-0 call; a lost rank 0 stops the group (`LearnerLost`)."""
        try:
            return self.wiring.get(ref)
        except self.wiring.actor_errors as err:
            self.lost(err)

    def call_all(self, method: str, *args: Any) -> GroupCall:
        """Start a method on every rank with the same arguments."""
        self.ready()
        return GroupCall([self.wiring.call(r, method, *args) for r in self.ranks])

    def ask_all(self, method: str, *args: Any) -> Any:
        """Call a method on every rank and wait; rank 0's result."""
        return self.gather(self.call_all(method, *args))[0]

    def gather(self, call: GroupCall) -> list:
        """Wait for every rank's result of `call`; the results in rank order."""
        while not call.done:
            self.poll(call, self.wiring.wait(call.waiting))
        return [call.results[i] for i in range(len(call.refs))]

    def poll(self, call: GroupCall, ready: list[int]) -> bool:
        """Take the results of `call` at positions `ready` of `call.waiting` (what
        `Wiring.wait` returns); whether every rank has answered now. A
        lost rank stops the group (`LearnerLost`). A rank that raised: the others get GRACE_S
        to end; unless every rank raised, the ranks are out of step and the group is stopped;
        then the error is raised (a `LearnerLost` if another rank was lost meanwhile)."""
        w = self.wiring
        for rank in [call.pending[i] for i in ready]:
            call.pending.remove(rank)
            try:
                call.results[rank] = w.get(call.refs[rank])
            except w.actor_errors as err:
                self.lost(err)
            except Exception as err:
                self.settle(call, err)
        return call.done

    def settle(self, call: GroupCall, err: Exception) -> NoReturn:
        w, deadline, in_step = self.wiring, time.monotonic() + GRACE_S, not call.results
        for ref in call.waiting:
            try:
                w.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                in_step = False  # this rank went on without the one that raised
            except w.actor_errors as lost:
                self.lost(lost)
            except w.timeout_errors:
                in_step = False  # waiting in a collective for the rank that raised
            except Exception:
                pass  # raised too
        call.pending.clear()
        if not in_step:
            log.error("the learner ranks are out of step after %r; stopping the group", err)
            self.stop()
        raise err

    # ----- loss and restart -----
    def lost(self, err: BaseException) -> NoReturn:
        """A rank was lost: stop every rank, and raise `LearnerLost` (how to resume)."""
        self.stop()
        raise LearnerLost(self.run_dir, err) from err

    def stop(self) -> None:
        """End every rank and free their placement group."""
        for rank in self.ranks:
            try:
                self.wiring.kill(rank)
            except Exception as err:  # already gone
                log.debug("kill %s: %s", rank, err)
        if self.placement is not None:
            try:
                self.wiring.remove_placement_group(self.placement)
            except Exception as err:
                log.debug("remove placement group: %s", err)
            self.placement = None
        self.joining = None

    def restart(self) -> None:
        """A new group in place of a stopped one (every rank from its initial state)."""
        self.stop()
        self.start()


def merged_metrics(results: list[dict]) -> dict:
    """One update's metrics from the ranks' own: a value every rank agrees on as it is (policy
    version, grad norm), others averaged over the ranks (each averaged over an equal share of
    the samples, so the mean is the group's; the staleness breakdown may weigh them unequally)."""
    versions = [r.get("policy_version") for r in results]
    if len(set(versions)) > 1:  # a rank that missed an update or a checkpoint: a bug, not noise
        raise RuntimeError(f"the learner ranks are out of step: policy versions {versions}")
    merged: dict = {}
    for key in results[0]:
        values = [r[key] for r in results if key in r]
        same = all(v == values[0] for v in values)
        merged[key] = values[0] if same else sum(values) / len(values)
    return merged
