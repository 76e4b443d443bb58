"""Frozen, typed configuration loaded from YAML (or a dict), with KVTIER_* environment overrides.

Every error names the key path, e.g. ``tiers[1].capacity: expected a size like 64GiB``.
The keys are documented in configs/README.md.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kvtier.codecs import make_codec
from kvtier.errors import ConfigError
from kvtier.plugins import TIERS
from kvtier.policies import make_policy
from kvtier.redact import redacted_dict
from kvtier.units import Size, parse_size

ENV_PREFIX = "KVTIER_"
# KVTIER_* variables read as themselves, not as config overrides (KVTIER_STATS_FILE: see connector/worker.py).
NOT_OVERRIDES = ("KVTIER_CONFIG", "KVTIER_HOME", "KVTIER_LOG_LEVEL", "KVTIER_STATS_FILE")


@dataclass(frozen=True)
class CodecConfig:
    """``name`` is a registered codec (none, lz4, zstd) or ``module:Class``; ``level`` goes to codecs with levels."""

    name: str = "none"
    level: int = 3
    shuffle: bool = False


@dataclass(frozen=True)
class PolicyConfig:
    """``name`` is a registered policy (lru, lfu, arc, attention) or ``module:Class``; ``params`` go to it."""

    name: str = "lru"
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TierConfig:
    """``kind`` is a registered tier kind (dram, disk, s3, redis) or ``module:Class``; ``options`` is an instance
    of that tier class's ``Options`` dataclass (its kind-specific keys)."""

    name: str
    kind: str
    capacity: Size
    codec: CodecConfig
    policy: PolicyConfig
    options: Any
    write_through: bool = False


@dataclass(frozen=True)
class ConnectorConfig:
    save_decode_blocks: bool = False
    async_load: bool = False
    transfer_threads: int = 2
    min_hit_blocks: int = 1
    save_timeout_s: float = 60.0
    sync_saves: bool = False  # store in the step that computed the blocks (reproducible benchmarks, debugging)


@dataclass(frozen=True)
class AttentionConfig:
    capture: Literal["off", "proxy", "window"] = "window"
    window: int = 16
    every_n_steps: int = 16  # decode steps between window samples (prefill steps are always sampled)
    key_memory: Size = Size(256 << 20)  # exact keys kept for window scoring (kvtier/attention/keystore.py)
    credit: Literal["block", "request"] = "request"  # a request's full blocks share their mean score


@dataclass(frozen=True)
class MetricsConfig:
    prometheus_port: int | None = None
    log_interval_s: float = 10.0


@dataclass(frozen=True)
class KVTierConfig:
    tiers: tuple[TierConfig, ...]
    checksum: Literal["xxh3", "crc32"] = "xxh3"
    promote_on_hit: bool = True
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @staticmethod
    def from_yaml(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> KVTierConfig:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        return KVTierConfig.from_dict(data, env=env, source=str(path))

    @staticmethod
    def from_dict(data: Mapping[str, Any], env: Mapping[str, str] | None = None, source: str = "") -> KVTierConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source or '<config>'}: expected a mapping at the top level")
        merged = apply_env_overrides(data, os.environ if env is None else env)
        try:
            return _build_root(merged)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """The resolved config as plain data; secrets masked and URLs without credentials unless ``redact``
        is False."""
        return redacted_dict(self) if redact else dataclasses.asdict(self)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"KVTierConfig({redacted_dict(self)!r})"


def default_config() -> KVTierConfig:
    """The embedded default: 2GiB of DRAM over 16GiB of disk."""
    return KVTierConfig.from_dict({"tiers": [
        {"kind": "dram", "capacity": "2GiB"},
        {"kind": "disk", "capacity": "16GiB", "path": "/tmp/kvtier/disk"},
    ]}, env={})


# ---- environment overrides -------------------------------------------------------------------------------

def apply_env_overrides(data: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """``KVTIER_TIERS__1__CAPACITY=8GiB`` sets ``tiers[1].capacity``; values are parsed as YAML scalars."""
    result: dict[str, Any] = _deep_copy(data)
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in NOT_OVERRIDES:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_path(result, parts, value, name)
    return result


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


# ---- typed building --------------------------------------------------------------------------------------

def _build_root(data: Mapping[str, Any]) -> KVTierConfig:
    tiers_raw = data.get("tiers")
    if not isinstance(tiers_raw, list) or not tiers_raw:
        raise ConfigError("tiers: expected a non-empty list of tiers")
    tiers = tuple(_build_tier(t, f"tiers[{i}]") for i, t in enumerate(tiers_raw))
    names = [t.name for t in tiers]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(f"tiers[{i}].name: duplicate tier name {name!r}")
    rest = {k: v for k, v in data.items() if k != "tiers"}
    return _build_dataclass(KVTierConfig, rest, "", preset={"tiers": tiers})


def _build_tier(raw: Any, path: str) -> TierConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping with at least 'kind' and 'capacity'")
    kind = raw.get("kind")
    if kind is None:
        raise ConfigError(f"{path}.kind: missing; expected one of {TIERS.names()} or 'package.module:Class'")
    tier_cls = TIERS.resolve(kind, f"{path}.kind")
    if "capacity" not in raw:
        raise ConfigError(f"{path}.capacity: missing (a size like 64GiB)")
    common = {"name", "kind", "capacity", "codec", "policy", "write_through"}
    codec_raw = raw.get("codec", tier_cls.default_codec)
    if isinstance(codec_raw, str):
        codec_raw = {"name": codec_raw}
    policy_raw = raw.get("policy", "lru")
    if isinstance(policy_raw, str):
        policy_raw = {"name": policy_raw}
    elif isinstance(policy_raw, Mapping):
        policy_raw = {"name": policy_raw.get("name", "lru"),
                      "params": {k: v for k, v in policy_raw.items() if k != "name"}}
    else:
        raise ConfigError(f"{path}.policy: expected a policy name or a mapping with 'name'")
    option_fields = {f.name for f in dataclasses.fields(tier_cls.Options)}
    for key in raw:
        if key not in common and key not in option_fields:
            known = ", ".join(sorted(common | option_fields))
            raise ConfigError(f"{path}.{key}: unknown key for a {kind} tier (expected one of: {known})")
    options = _build_dataclass(tier_cls.Options, {k: v for k, v in raw.items() if k not in common}, path)
    codec = _build_dataclass(CodecConfig, codec_raw, f"{path}.codec")
    policy = _build_dataclass(PolicyConfig, policy_raw, f"{path}.policy")
    make_codec(codec, f"{path}.codec")  # unknown names, bad levels and bad parameters fail here, not at start-up
    make_policy(policy, f"{path}.policy")
    return TierConfig(
        name=_check_type(raw.get("name", kind.rpartition(":")[2].lower()), str, f"{path}.name"),
        kind=kind,
        capacity=_convert(raw["capacity"], Size, f"{path}.capacity"),
        codec=codec,
        policy=policy,
        options=options,
        write_through=_check_type(raw.get("write_through", False), bool, f"{path}.write_through"),
    )


def _build_dataclass(cls: type, raw: Any, path: str, preset: Mapping[str, Any] | None = None) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path or '<root>'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    preset = dict(preset or {})
    for key in raw:
        if key not in fields or key in preset:
            known = ", ".join(sorted(set(fields) - set(preset)))
            raise ConfigError(f"{_join(path, str(key))}: unknown key (expected one of: {known})")
    values = dict(preset)
    for name in fields:
        if name in raw:
            values[name] = _convert(raw[name], hints[name], _join(path, name))
    try:
        return cls(**values)
    except ConfigError as exc:  # a dataclass's own checks (__post_init__) name the key relative to it
        raise ConfigError(f"{_join(path, str(exc))}" if path else str(exc)) from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _convert(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Size:
        try:
            return Size(parse_size(value))
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}, got {value!r}") from None
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{path}: expected one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], path)
    if origin is Mapping or hint is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return _build_dataclass(hint, value, path)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return _check_type(value, hint, path)


def _check_type(value: Any, expected: type, path: str) -> Any:
    if expected is Any:
        return value
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
    return value
