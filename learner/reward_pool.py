"""A pool of reward actors per reward, sized on its own: at start, from its backlog, on request.

The driver sends each batch to the least-loaded actor of each reward's pool. A pool grows by one
actor when its backlog (calls in flight per actor) passes `grow_at` and shrinks by one when it
has been idle for `shrink_after` checks, always within [min_size, max_size]. Only idle actors
are removed, so a resize never loses a batch; samplers are never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ddpo.pools import PoolSize

log = logging.getLogger(__name__)


class RewardPool:
    """The reward actors of one reward behind `score(reward_input) -> ref`.

    make_actor: creates one actor (the wiring's handle); call(actor, reward_input): starts a
    score call and returns its ref; kill(actor): ends an actor.
    """

    def __init__(
        self,
        name: str,
        size: PoolSize,
        make_actor: Callable[[], Any],
        call: Callable[[Any, Any], Any],
        kill: Callable[[Any], None] = lambda actor: None,
        grow_at: float = 2.0,
        shrink_after: int = 20,
    ):
        self.name, self.size = name, size
        self._make, self._call, self._kill = make_actor, call, kill
        self.grow_at, self.shrink_after = grow_at, shrink_after
        self.actors: list[Any] = [make_actor() for _ in range(size.start)]
        self.load: dict[int, int] = {id(a): 0 for a in self.actors}
        self._owner: dict[Any, Any] = {}  # call ref -> actor
        self._idle_checks = 0
        self.scored = 0

    def __len__(self) -> int:
        return len(self.actors)

    @property
    def backlog(self) -> int:
        """Score calls in flight over the whole pool."""
        return sum(self.load.values())

    def score(self, reward_input: Any) -> Any:
        """Send one batch to the least-loaded actor; returns the call's ref."""
        actor = min(self.actors, key=lambda a: self.load[id(a)])
        ref = self._call(actor, reward_input)
        self.load[id(actor)] += 1
        self._owner[_key(ref)] = actor
        return ref

    def done(self, ref: Any) -> None:
        """Mark a call finished (after its result was fetched)."""
        actor = self._owner.pop(_key(ref), None)
        if actor is not None and id(actor) in self.load:
            self.load[id(actor)] -= 1
            self.scored += 1

    def resize(self, target: int) -> int:
        """Grow or shrink towards `target` within [min, max]; shrinking removes idle actors only.
        Returns the new size."""
        target = max(self.size.min, min(self.size.max, target))
        while len(self.actors) < target:
            actor = self._make()
            self.actors.append(actor)
            self.load[id(actor)] = 0
            log.info("reward pool %s grew to %d", self.name, len(self.actors))
        idle = [a for a in self.actors if self.load[id(a)] == 0]
        while len(self.actors) > target and idle:
            actor = idle.pop()
            self.actors.remove(actor)
            del self.load[id(actor)]
            self._kill(actor)
            log.info("reward pool %s shrank to %d", self.name, len(self.actors))
        return len(self.actors)

    def autoscale(self) -> int:
        """One step of backlog-driven sizing; call it once per driver loop."""
        per_actor = self.backlog / len(self.actors)
        if per_actor > self.grow_at and len(self.actors) < self.size.max:
            self._idle_checks = 0
            return self.resize(len(self.actors) + 1)
        self._idle_checks = self._idle_checks + 1 if self.backlog == 0 else 0
        if self._idle_checks >= self.shrink_after and len(self.actors) > self.size.min:
            self._idle_checks = 0
            return self.resize(len(self.actors) - 1)
        return len(self.actors)


def _key(ref: Any) -> Any:
    """A hashable key for a call result (a Ray ObjectRef is hashable; a plain value may not be)."""
    try:
        hash(ref)
        return ref
    except TypeError:
        return id(ref)
