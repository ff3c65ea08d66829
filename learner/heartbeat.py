"""A heartbeat for the console when nobody sees a progress bar.

Under `ray job submit`, a KubeRay RayJob or `python -m learner.run > log 2>&1`, stderr is no
terminal: tqdm draws nothing, and the console says nothing between two epoch lines (minutes on
the paper's models) nor during the start evaluation (70-90 s). There, `Heartbeat` logs one line
whenever `interval` seconds pass without one, naming the phase and how long it has run:

    beat = Heartbeat()                      # 30 s; off when stderr is a terminal
    with beat.phase("start evaluation"):    # nested phases: the innermost is named
        ...                                 # -> "still start evaluation: 30 s", "...: 60 s"
    beat.touch()                            # a line was printed: the next beat is 30 s away
    beat.close()
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class Heartbeat:
    """Logs `still <phase>: N s` from a daemon thread whenever `interval` seconds pass without a
    beat, a `touch()` or a new phase; only where `stream` (stderr) is not a terminal, where a
    progress bar shows the same."""

    def __init__(self, interval: float = HEARTBEAT_S, stream: TextIO | None = None):
        self.interval = interval
        self.enabled = interval > 0 and not is_terminal(stream or sys.stderr)
        self._phases: list[tuple[str, float]] = []  # (name, start), innermost last
        self._quiet_since = time.monotonic()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Name what runs inside the block (and restart the count to the next beat)."""
        entry = (name, time.monotonic())
        with self._lock:
            self._phases.append(entry)
            self._quiet_since = entry[1]
            if self.enabled and self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._phases.remove(entry)

    def touch(self) -> None:
        """Something was printed: wait a full interval before the next beat."""
        with self._lock:
            self._quiet_since = time.monotonic()

    def close(self) -> None:
        """Stop the thread (idempotent)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                due = self._quiet_since + self.interval
                phase = self._phases[-1] if self._phases else None
                if phase is not None and now >= due:
                    self._quiet_since = now
            if phase is not None and now >= due:
                log.info("still %s: %.0f s", phase[0], now - phase[1])
                continue
            self._wake.wait(max(due - now, 0.01) if phase is not None else self.interval)
