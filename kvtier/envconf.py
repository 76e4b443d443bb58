"""KVTIER_* environment variables that override single config keys.

``KVTIER_TIERS__1__CAPACITY=8GiB`` sets ``tiers[1].capacity``: ``__`` separates the key path's parts, list
indices are numbers, values are parsed as YAML scalars. A variable overrides only when it names a key path:
either it has ``__`` (then its first part must be a top-level key, else a ConfigError names the closest one)
or it is exactly a top-level key (``KVTIER_CHECKSUM``). Any other KVTIER_* variable belongs to somebody else
(a deployment's own ``KVTIER_EVAL_TP``) and is ignored with one warning, unless it is a near miss of a
top-level key (``KVTIER_CHEKSUM``), which fails. Some names are read as themselves, never as overrides.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Collection, Mapping
from typing import Any

import yaml

from kvtier.errors import ConfigError
from kvtier.schema import closest

log = logging.getLogger("kvtier.config")
ENV_PREFIX = "KVTIER_"
# Read as themselves (KVTIER_STATS_FILE: the benchmark harness's connector; KVTIER_AUTH_KEY: auth.key_env).
NOT_OVERRIDES = ("KVTIER_CONFIG", "KVTIER_HOME", "KVTIER_LOG_LEVEL", "KVTIER_STATS_FILE", "KVTIER_AUTH_KEY")
_warned: set[str] = set()


def apply_env_overrides(data: Mapping[str, Any], env: Mapping[str, str], top_keys: Collection[str]) -> dict[str, Any]:
    result: dict[str, Any] = _deep_copy(data)
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in NOT_OVERRIDES:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if not _is_override(name, parts, top_keys):
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_path(result, parts, value, name)
    return result


def _is_override(name: str, parts: list[str], top_keys: Collection[str]) -> bool:
    if parts[0] in top_keys:
        return True
    if len(parts) > 1:
        raise ConfigError(f"{name}: {parts[0]!r} is not a top-level config key{closest(parts[0], top_keys)} "
                          f"(expected one of: {', '.join(sorted(top_keys))})")
    if difflib.get_close_matches(parts[0], list(top_keys), n=1, cutoff=0.8):
        raise ConfigError(f"{name}: {parts[0]!r} is not a config key{closest(parts[0], top_keys)}")
    if name not in _warned:
        _warned.add(name)
        log.warning("kvtier: ignoring environment variable %s: it names no config key (overrides look like "
                    "KVTIER_TIERS__1__CAPACITY or KVTIER_CHECKSUM)", name)
    return False


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_deep_copy(v) for v in value]
    return value


def _set_path(root: dict[str, Any], parts: list[str], value: Any, env_name: str) -> None:
    node: Any = root
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{env_name}: no list item {part!r} to override")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{env_name}: cannot descend into a scalar at {part!r}")
