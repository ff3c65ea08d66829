"""How many CPU threads torch uses for each step, chosen from measured step times.

On CPU, torch parallelises each op over OpenMP threads that wait for each other at the end of
every op, spinning first. On a quiet machine that is the fastest setting. When another process
takes a core, the thread on that core is descheduled and its partner spins at every barrier
until the scheduler brings it back: on 2 cores, one busy process made the tiny model's epoch
about 20x slower. One thread never waits for another and keeps nearly its quiet speed, but on a
quiet machine it is 1.2-1.5x slower than two. `OMP_WAIT_POLICY=PASSIVE` (sleep instead of spin)
avoids the collapse but is slower than one thread in both cases, since the tiny model's ops are
too short to pay for a wake-up. Measurements: BENCHMARKS.md, "Sharing the machine".

So `ThreadGovernor` measures: it times each step (a denoising step, a training step) with the
full thread count and with one thread, keeps an exponential moving average of each, uses the
faster one, and now and then tries the other again so that it notices when the load changes.
Sampling gives bit-identical results with any thread count; training's reductions may differ in
the last bits, so a run that must reproduce bit for bit fixes the count (DDPO_THREADS=N).

Settings, the user's always winning, read in the driver's process (`role_threads`):
DDPO_THREADS=N fixes N threads in every sampler and learner of a run, DDPO_THREADS=fixed the
driver's share of the cores (both make training bit-reproducible); otherwise the driver's
OMP_NUM_THREADS=N does; otherwise the governor chooses between the count the driver gives each
actor and one. `actor_env()` carries these variables (and OMP_WAIT_POLICY, GOMP_SPINCOUNT,
which OpenMP reads at start-up) to Ray actors on every node.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

import torch

THREAD_ENV = ("DDPO_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
"""Thread settings the driver's environment passes on to every actor it starts."""


def actor_env() -> dict[str, str]:
    """The thread settings of this process's environment, for a Ray actor's runtime_env."""
    return {name: os.environ[name] for name in THREAD_ENV if os.environ.get(name)}


def role_threads(split: int) -> tuple[int, bool]:
    """(threads, adaptive) for a sampler or learner, decided in the driver's process: the
    user's count if set; with DDPO_THREADS=fixed, `split` (the driver's share of the cores)
    never adapted; else adaptive between `split` and 1. Decided here, not in the actor, because
    Ray sets OMP_NUM_THREADS in every worker to its CPU request (1), which must not pass for the
    user's choice."""
    if os.environ.get("DDPO_THREADS", "").strip().lower() == "fixed":
        return split, False
    fixed = fixed_threads()
    return (fixed, False) if fixed is not None else (split, True)


def fixed_threads() -> int | None:
    """The thread count the user fixed (DDPO_THREADS, else OMP_NUM_THREADS), or None."""
    for name in ("DDPO_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value and value.lower() not in ("auto", "fixed"):
            try:
                threads = int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r}: give a whole number of threads") from None
            if threads < 1:
                raise ValueError(f"{name}={threads}: give at least 1 thread")
            return threads
    return None


class ThreadGovernor:
    """Sets torch's thread count before each step: the faster of `max_threads` and 1, measured.

    `with governor.step(key): ...` around one unit of repeated work; steps with the same key
    (e.g. ("denoise", batch size)) are compared with each other. torch's thread count belongs to
    the OS thread, so it is set again at every step. `max_threads=None` sets nothing.
    """

    def __init__(
        self,
        max_threads: int | None,
        adaptive: bool = True,
        probe_every: int = 32,
        max_probe_every: int = 512,
        smoothing: float = 0.25,
        clock: Callable[[], float] = time.perf_counter,
        set_threads: Callable[[int], None] = torch.set_num_threads,
    ):
        self.max_threads = max_threads
        self.adaptive = adaptive and max_threads is not None and max_threads > 1
        self.probe_every, self.max_probe_every = probe_every, max_probe_every
        self.smoothing = smoothing
        self.clock, self.set_threads = clock, set_threads
        self.seconds: dict[tuple[Hashable, int], float] = {}  # (key, threads) -> EMA of a step
        self.seen: dict[tuple[Hashable, int], int] = {}  # steps timed, the first one skipped
        self.steps: dict[Hashable, int] = {}  # steps since the last probe, per key
        self.interval: dict[Hashable, int] = {}  # current probe interval, per key
        self.probing: dict[Hashable, bool] = {}  # is the step of this key under way a probe?
        self.used: dict[int, int] = {}  # thread count -> steps run with it (for metrics)

    def choose(self, key: Hashable) -> int:
        """The thread count for the next step of `key`."""
        assert self.max_threads is not None
        if not self.adaptive:
            return self.max_threads
        many, one = self.max_threads, 1
        self.probing[key] = False
        for n in (many, one):  # measure each at least twice (the first run warms up)
            if self.seen.get((key, n), 0) < 2:
                return n
        best, other = (
            (many, one) if self.seconds[key, many] <= self.seconds[key, one] else (one, many)
        )
        self.steps[key] = self.steps.get(key, 0) + 1
        if self.steps[key] >= self.interval.get(key, self.probe_every):
            self.steps[key] = 0
            self.probing[key] = True
            return other  # a probe: has the load changed?
        return best

    @contextmanager
    def step(self, key: Hashable = None) -> Iterator[int]:
        if self.max_threads is None:
            yield torch.get_num_threads()
            return
        n = self.choose(key)
        self.set_threads(n)
        start = self.clock()
        yield n
        self.record(key, n, self.clock() - start)

    def record(self, key: Hashable, n: int, seconds: float) -> None:
        self.used[n] = self.used.get(n, 0) + 1
        if not self.adaptive:
            return
        seen = self.seen.get((key, n), 0)
        self.seen[key, n] = seen + 1
        if seen == 0:
            return  # warm-up: allocations, first-touch, thread start
        old = self.seconds.get((key, n))
        if old is None or self.probing.get(key):
            # A probe replaces what may be a stale figure outright: a wrong switch corrects
            # itself, since the count in use is timed at every step.
            self.seconds[key, n] = seconds
        else:
            self.seconds[key, n] = old + self.smoothing * (seconds - old)
        if self.probing.get(key):
            # A clear loss backs probing off (each costs a slow step); a close call or a win
            # probes at the base rate again.
            other = self.seconds[key, 1 if n != 1 else self.max_threads or 1]
            interval = self.interval.get(key, self.probe_every)
            lost = seconds > 1.5 * other
            self.interval[key] = (
                min(2 * interval, self.max_probe_every) if lost else self.probe_every
            )

    def share(self) -> dict[str, float]:
        """Fraction of steps run with each thread count since the last call (for metrics)."""
        total = sum(self.used.values())
        shares = {f"threads/{n}": c / total for n, c in sorted(self.used.items())} if total else {}
        self.used.clear()
        return shares
