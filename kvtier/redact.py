"""Keeping secrets out of every output: URLs without credentials, config dumps without secret values.

``redact_url`` never parses the credentials it hides: a password may hold any character ('/', '#', '?', '@'),
which confuses URL parsers, so everything between the scheme and the *last* '@' goes, and so do query strings
and fragments (``?password=...``). Dataclass fields marked ``metadata={"secret": True}`` print as ``***``; fields
marked ``metadata={"url": True}`` print redacted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

MASK = "***"


def redact_url(url: str | None) -> str:
    """The URL without user name, password, query or fragment, for messages, reprs and dumps."""
    if not url:
        return "<default endpoint>"
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        rest = f"{MASK}@" + rest.rpartition("@")[2]
    for mark in ("?", "#"):
        rest = rest.partition(mark)[0]
    return f"{scheme}://{rest}" if sep else rest


def redacted_dict(obj: Any) -> Any:
    """``dataclasses.asdict``-like, with secret fields masked and URL fields redacted, recursively."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("secret") and value:
                out[f.name] = MASK
            elif f.metadata.get("url") and isinstance(value, str):
                out[f.name] = redact_url(value)
            else:
                out[f.name] = redacted_dict(value)
        return out
    if isinstance(obj, dict):
        return {k: redacted_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redacted_dict(v) for v in obj]
    return obj


def redacted_repr(self: Any) -> str:
    """A dataclass ``__repr__`` that masks secret fields and strips credentials from URL fields."""
    fields = ", ".join(f"{k}={v!r}" for k, v in redacted_dict(self).items())
    return f"{type(self).__name__}({fields})"
