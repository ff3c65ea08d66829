"""Wiring: the same driver loop runs on Ray (actors, ObjectRefs) or in one process (tests,
debugging, the overhead benchmark). Where each role's actors go: `learner.fleet`."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any, Protocol

from ddpo.threads import actor_env
from learner.pending import wait_started

log = logging.getLogger(__name__)


class Wiring(Protocol):
    """What a driver needs of the machinery under it: create actors, call their methods, get
    results. `InProcess` and `OnRay` are the two; a test may bring its own."""

    actor_errors: tuple[type[BaseException], ...]  # a call to an actor that died raises these
    lost_errors: tuple[type[BaseException], ...]  # a result lost with its node raises these
    timeout_errors: tuple[type[BaseException], ...]  # a `get` that timed out raises these

    def create(self, cls: type, *args: Any, options: dict | None = None) -> Any: ...

    def call(
        self, handle: Any, method: str, *args: Any, num_returns: int = 1, group: str | None = None
    ) -> Any: ...

    def get(self, refs: Any, timeout: float | None = None) -> Any: ...

    def get_ready(self, refs: list, timeout: float) -> list: ...

    def wait(self, refs: list, num_returns: int = 1) -> list[int]: ...

    def wait_started(self, actors: dict[str, Any], report_s: float, timeout_s: float) -> None: ...

    def kill(self, handle: Any) -> None: ...

    def placement_group(self, bundles: list[dict[str, float]], strategy: str) -> tuple[Any, list]:
        """Reserve `bundles` together: (the group, each bundle's `create` options)."""
        ...

    def remove_placement_group(self, group: Any) -> None: ...


class InProcess:
    """Calls methods directly; results are plain values."""

    actor_errors: tuple[type[BaseException], ...] = ()  # nothing dies here
    lost_errors: tuple[type[BaseException], ...] = ()  # nor is anything lost
    timeout_errors: tuple[type[BaseException], ...] = ()  # nor waited for

    def create(self, cls: type, *args: Any, options: dict | None = None) -> Any:
        return cls(*args)

    def call(
        self, handle: Any, method: str, *args: Any, num_returns: int = 1, group: str | None = None
    ) -> Any:
        return getattr(handle, method)(*args)

    def get(self, refs: Any, timeout: float | None = None) -> Any:
        return refs

    def get_ready(self, refs: list, timeout: float) -> list:
        return refs

    def wait(self, refs: list, num_returns: int = 1) -> list[int]:
        return list(range(min(num_returns, len(refs))))  # every call has returned already

    def wait_started(self, actors: dict[str, Any], report_s: float, timeout_s: float) -> None:
        pass  # created when `create` returned

    def kill(self, handle: Any) -> None:
        pass

    def placement_group(self, bundles: list[dict[str, float]], strategy: str) -> tuple[Any, list]:
        raise ValueError(
            f"{len(bundles)} learners need a process each: run on Ray, or use one learner"
        )

    def remove_placement_group(self, group: Any) -> None:
        pass


@contextlib.contextmanager
def own_sigterm_handler() -> Iterator[None]:
    """Keep a SIGTERM handler this process set over the one `ray.init` sets. Ray's exits on the
    spot (no checkpoint); the driver's (`learner.run`) stops the run as Ctrl-C does, and Ray's
    atexit hook then stops the local instance. Without a handler of our own, Ray's stays."""
    if threading.current_thread() is not threading.main_thread():
        yield  # neither Ray nor we can set one here
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(before):
            signal.signal(signal.SIGTERM, before)


class OnRay:
    """Actors and ObjectRefs; the driver never touches images or trajectories."""

    def __init__(self, address: str | None, min_cpus: int, resources: dict[str, float]):
        import ray

        self.ray = ray
        # A call to an actor that died (and was restarted, or not) raises these.
        self.actor_errors: tuple[type[BaseException], ...] = (ray.exceptions.RayActorError,)
        # A result that lived on a lost node (and cannot be recomputed) raises these.
        self.lost_errors: tuple[type[BaseException], ...] = (ray.exceptions.ObjectLostError,)
        self.timeout_errors: tuple[type[BaseException], ...] = (ray.exceptions.GetTimeoutError,)
        self.requests: dict[Any, dict[str, float]] = {}  # actor -> the resources it asks for
        # Inside `ray job submit` RAY_ADDRESS names the cluster: join it.
        address = address or os.environ.get("RAY_ADDRESS")
        self.joined = bool(address)
        if not ray.is_initialized():
            with own_sigterm_handler():
                if address:
                    ray.init(address=address)
                else:
                    # Ray runs workers at nice 15 by default; our actors are the work, and at
                    # nice 15 a Ray daemon waking up stalls torch's threads (sampling was 6%
                    # slower).
                    os.environ.setdefault("RAY_worker_niceness", "0")
                    # Logical CPUs: in sync mode the actors take turns, so they may share cores.
                    ray.init(num_cpus=max(os.cpu_count() or 1, min_cpus), resources=resources)

    def create(self, cls: type, *args: Any, options: dict | None = None) -> Any:
        options = dict(options or {"num_cpus": 1})
        # Role resources place actors on their node type. On a joined cluster they are kept even
        # when no node offers them yet (the autoscaler starts one); on a Ray instance of this
        # process that lacks them, the actor goes anywhere, with a warning.
        wanted = options.pop("resources", {})
        resources = wanted
        if not self.joined:
            available = self.ray.cluster_resources()
            resources = {k: v for k, v in wanted.items() if k in available}
            if len(resources) < len(wanted):
                log.warning(
                    "Ray offers no %s; placing %s anywhere",
                    sorted(set(wanted) - set(resources)),
                    cls.__name__,
                )
        # The user's thread settings (DDPO_THREADS, OMP_*) reach actors on every node; a local
        # instance's workers would inherit them, a joined cluster's would not.
        env = actor_env()
        if env and "runtime_env" not in options:
            options["runtime_env"] = {"env_vars": env}
        # Concurrency groups belong to the actor class, not to .options().
        groups = options.pop("concurrency_groups", None)
        actor_cls = (
            self.ray.remote(concurrency_groups=groups)(cls)  # type: ignore[call-overload]
            if groups
            else self.ray.remote(cls)
        )
        handle = actor_cls.options(**options, resources=resources).remote(*args)
        asked = {"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0)}
        self.requests[handle] = {k: v for k, v in (asked | resources).items() if v}
        return handle

    def call(
        self, handle: Any, method: str, *args: Any, num_returns: int = 1, group: str | None = None
    ) -> Any:
        options: dict[str, Any] = {"num_returns": num_returns}
        if group:
            options["concurrency_group"] = group
        return getattr(handle, method).options(**options).remote(*args)

    def get(self, refs: Any, timeout: float | None = None) -> Any:
        return self.ray.get(refs, timeout=timeout)

    def get_ready(self, refs: list, timeout: float) -> list:
        """The values of those refs that are ready within `timeout` seconds."""
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=timeout)
        return self.ray.get(ready)

    def wait(self, refs: list, num_returns: int = 1) -> list[int]:
        """The positions in `refs` of `num_returns` refs that are ready, waiting for them."""
        ready = set(self.ray.wait(refs, num_returns=num_returns)[0])
        return [i for i, ref in enumerate(refs) if ref in ready]

    def wait_started(self, actors: dict[str, Any], report_s: float, timeout_s: float) -> None:
        """Wait until every actor of `actors` ({name: handle}) has started; say every `report_s`
        what the waiting ones lack, and stop after `timeout_s` if nothing can give it to them
        (`learner.pending`)."""
        asked = {name: (h, self.requests.get(h, {})) for name, h in actors.items()}
        wait_started(self.ray, asked, report_s, timeout_s, joined=self.joined)

    def kill(self, handle: Any) -> None:
        self.requests.pop(handle, None)
        self.ray.kill(handle)

    def placement_group(self, bundles: list[dict[str, float]], strategy: str) -> tuple[Any, list]:
        """A Ray placement group of `bundles` with `strategy` (PACK, STRICT_SPREAD, ...), and
        for each bundle the options that put an actor in it. Role resources that a Ray instance
        of this process lacks are left out, as `create` leaves them out of the actor's request."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not self.joined:
            available = self.ray.cluster_resources()
            bundles = [{k: v for k, v in b.items() if k in available} for b in bundles]
        group = self.ray.util.placement_group(bundles, strategy=strategy)
        options = [
            {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, i)}
            for i in range(len(bundles))
        ]
        return group, options

    def remove_placement_group(self, group: Any) -> None:
        self.ray.util.remove_placement_group(group)
