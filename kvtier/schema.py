"""Typed building of frozen config dataclasses from plain data, with errors that name the key path.

Field metadata adds checks: ``bounded(default, lo, hi)`` (numbers and sizes within [lo, hi]); unknown keys name
the closest known key. A dataclass's own ``__post_init__`` may raise ConfigError with a message starting with
its field name; the path is prefixed here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from kvtier.errors import ConfigError
from kvtier.units import Size, parse_size

MAX_SIZE = 1 << 60  # 1 EiB: any size above this is a typo, not a deployment


def bounded(default: Any, lo: float | None = None, hi: float | None = None, **metadata: Any) -> Any:
    """A dataclass field whose value must lie within [lo, hi] (either end optional)."""
    return dataclasses.field(default=default, metadata={"min": lo, "max": hi, **metadata})


def closest(name: str, known: Iterable[str]) -> str:
    """' (did you mean X?)' for the nearest known name, or ''."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def build_dataclass(cls: type, raw: Any, path: str, preset: Mapping[str, Any] | None = None) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path or '<root>'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    preset = dict(preset or {})
    for key in raw:
        if key not in fields or key in preset:
            known = sorted(set(fields) - set(preset))
            raise ConfigError(f"{join(path, str(key))}: unknown key{closest(str(key), known)} "
                              f"(expected one of: {', '.join(known)})")
    values = dict(preset)
    for name, f in fields.items():
        if name in raw:
            values[name] = convert(raw[name], hints[name], join(path, name))
            check_bounds(values[name], f, join(path, name))
    try:
        return cls(**values)
    except ConfigError as exc:  # a dataclass's own checks (__post_init__) name the key relative to it
        raise ConfigError(f"{join(path, str(exc))}" if path else str(exc)) from None


def check_bounds(value: Any, f: dataclasses.Field[Any], path: str) -> None:
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: expected a finite number, got {value!r}")
    if lo is not None and value < lo:
        raise ConfigError(f"{path}: must be at least {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{path}: must be at most {hi}, got {value!r}")


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def convert(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Size:
        try:
            size = parse_size(value)
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}, got {value!r}") from None
        if size > MAX_SIZE:
            raise ConfigError(f"{path}: {value!r} is larger than 1 EiB; expected a size like 64GiB")
        return Size(size)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{path}: expected one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return convert(value, inner[0], path)
    if origin is Mapping or hint is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, path)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return check_type(value, hint, path)


def check_type(value: Any, expected: type, path: str) -> Any:
    if expected is Any:
        return value
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
    return value
