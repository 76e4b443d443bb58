"""Human-readable byte sizes: "64GiB", "512MB", "1.5 GiB", or a plain integer of bytes."""

from __future__ import annotations

import re
import typing

Size = typing.NewType("Size", int)  # a byte count; config values of this type accept "64GiB" etc.

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """Return a byte count for ``value``; raise ValueError with a readable message when it is not a size."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 64GiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("expected a non-negative size")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match and match.group(2).lower() in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise ValueError("expected a size like 64GiB")


def format_size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f}{unit}" if unit == "B" else f"{nbytes:.1f}{unit}"
        nbytes /= 1024
    return f"{nbytes}B"
