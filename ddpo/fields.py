"""Nested frozen dataclasses, generically: replace fields by dotted path, name the fields in
which two differ, and build one back from a JSON object. `ddpo.config` builds its `Config` on
them (and re-exports `ConfigError` and `override`); nothing here knows a field of it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A config value that its checks refuse; the message names the value and the fix."""


def override(config: C, changes: Mapping[str, Any]) -> C:
    """`config` with the fields named by dotted paths replaced, every level checked:
    override(config, {"run.epochs": 3, "train.learning_rate": 1e-2}); a sub-config's changes may
    also come as one mapping, {"run": {"epochs": 3}}."""
    names = [f.name for f in dataclasses.fields(config)]  # type: ignore[arg-type]
    nested: dict[str, Any] = {}
    for path, value in changes.items():
        top, _, rest = path.partition(".")
        if top not in names:
            moved = [
                f"{name}.{top}"
                for name in names
                if dataclasses.is_dataclass(part := getattr(config, name))
                and top in {f.name for f in dataclasses.fields(part)}
            ]
            hint = f"it is {moved[0]}" if moved else f"choose one of {', '.join(names)}"
            raise ConfigError(f"{type(config).__name__} has no field {top!r}; {hint}")
        if rest:
            nested.setdefault(top, {})[rest] = value
        elif isinstance(value, Mapping):
            nested.setdefault(top, {}).update(value)
        else:
            nested[top] = value
    for name, value in nested.items():
        if isinstance(value, dict):
            nested[name] = override(getattr(config, name), value)
    return dataclasses.replace(config, **nested)  # type: ignore[type-var]


def differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names of the leaf fields in which two configs of one class differ."""
    out = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x):
            out += differences(x, y, f"{prefix}{f.name}.")
        elif x != y:
            out.append(prefix + f.name)
    return out


def from_dict(cls: type, data: dict, where: str) -> Any:
    """An instance of the dataclass `cls` from a JSON object: nested dataclasses from nested
    objects, lists as tuples, paths as `Path`; a field `cls` does not know is refused, naming
    `where` it was found."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where} has fields this version does not know: {unknown}")
    types = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(types[name]) and isinstance(value, dict):
            value = from_dict(types[name], value, f"{where}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        elif types[name] == Path | None and value is not None:
            value = Path(value)
        values[name] = value
    return cls(**values)
