"""The size of each reward's pool of actors: how many at the start, and the bounds an
autoscaled pool stays within (`--reward-workers`, `--reward-workers-range`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ddpo.fields import ConfigError


@dataclass(frozen=True)
class PoolSize:
    """The size of one reward's pool of actors: at start, and the bounds it scales within."""

    start: int = 1
    min: int = 1
    max: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.start <= self.max:
            raise ConfigError(
                f"reward pool sizes need 1 <= min <= start <= max, got min={self.min} "
                f"start={self.start} max={self.max}; a pool has at least one actor"
            )


def parse_pool_sizes(workers: tuple[str, ...], ranges: tuple[str, ...]) -> dict[str, PoolSize]:
    """["aesthetic=4"], ["aesthetic=2:8"] -> {"aesthetic": PoolSize(start=4, min=2, max=8)}."""

    def pairs(items: tuple[str, ...], flag: str) -> dict[str, str]:
        out = {}
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or not name or not value:
                raise ConfigError(f"{flag} {item!r} must look like NAME=VALUE, e.g. aesthetic=4")
            out[name] = value
        return out

    def whole(flag: str, name: str, value: str) -> int:
        if not value.strip().isdigit():
            raise ConfigError(f"{flag} {name}={value!r}: give a whole number of actors, e.g. 4")
        return int(value)

    flag = "--reward-workers"
    starts = {k: whole(flag, k, v) for k, v in pairs(workers, flag).items()}
    bounds = {}
    flag = "--reward-workers-range"
    for name, value in pairs(ranges, flag).items():
        low, sep, high = value.partition(":")
        if not sep:
            raise ConfigError(f"{flag} {name}={value!r} must be MIN:MAX, e.g. 1:8")
        bounds[name] = (whole(flag, name, low), whole(flag, name, high))
    sizes = {}
    for name in starts.keys() | bounds.keys():
        start = starts.get(name, bounds.get(name, (1, 1))[0])
        least, most = bounds.get(name, (start, start))
        try:
            sizes[name] = PoolSize(start=start, min=least, max=most)
        except ValueError as err:
            raise ConfigError(f"{name}: {err}") from None
    return sizes
