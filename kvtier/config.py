"""Frozen, typed configuration loaded from YAML (or a dict), with KVTIER_* environment overrides.

Every error names the key path, e.g. ``tiers[1].capacity: expected a size like 64GiB``.
The keys are documented in configs/README.md.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kvtier.codecs import make_codec
from kvtier.envconf import apply_env_overrides
from kvtier.errors import ConfigError
from kvtier.plugins import TIERS
from kvtier.policies import make_policy
from kvtier.redact import redacted_dict, redacted_repr
from kvtier.schema import MAX_SIZE, bounded, build_dataclass, check_type, convert
from kvtier.units import Size



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
    save_decode_blocks: bool = True
    async_load: bool = False
    transfer_threads: int = bounded(2, 1, 256)
    min_hit_blocks: int = bounded(1, 0)
    save_timeout_s: float = bounded(60.0, 0.0)  # how long shutdown waits for queued saves before dropping them
    # Host copies of blocks waiting to be stored; beyond this, new saves are dropped (and counted).
    max_pending_save_bytes: Size = bounded(Size(1 << 30), 0, MAX_SIZE)
    # The host staging pool every device copy goes through (pinned on CUDA), allocated once at start-up and
    # cut into chunks of ``staging_chunk_bytes`` (kvtier/transfer/staging.py); saves use at most half of it, so
    # half of it bounds the bytes one step can save (a prefill step of 8k tokens of an 8B model saves 1 GiB).
    staging_bytes: Size = bounded(Size(1 << 30), 1, MAX_SIZE)
    staging_chunk_bytes: Size = bounded(Size(16 << 20), 1, MAX_SIZE)
    # Sync loads: let each attention layer wait for its own layer's copy (needs piecewise CUDA graphs) instead
    # of the whole load before the forward.
    layerwise_load: bool = False
    # Store each step's blocks before the step returns (reproducible benchmarks, debugging).
    sync_saves: bool = False
    # Freed host memory the worker process keeps (glibc) instead of returning it to the OS, so block-sized
    # buffers are not page-faulted in on every load and save (kvtier/hostmem.py); 0 leaves the allocator alone.
    keep_freed_memory: Size = bounded(Size(256 << 20), 0, MAX_SIZE)
    # Niceness added to the threads that store saved blocks (Linux): the forward's threads then preempt the
    # stores' encoding and writing, which move to the engine's idle time; saves land later while the engine is
    # busy (a save that waits past max_pending_save_bytes is dropped: a future miss). 0 leaves them as they are.
    save_nice: int = bounded(19, 0, 19)
    # Run those threads under SCHED_IDLE (Linux; save_nice then no longer matters): a CPU that any other thread
    # wants preempts them at once, so saves take only idle time; on a saturated CPU they wait longest (and are
    # dropped first). False leaves them under save_nice.
    save_idle: bool = True


@dataclass(frozen=True)
class AttentionConfig:
    capture: Literal["off", "proxy", "window"] = "window"
    window: int = bounded(16, 1, 4096)
    every_n_steps: int = bounded(16, 1)  # decode steps between window samples (prefill steps are always sampled)
    key_memory: Size = Size(256 << 20)  # exact keys kept for window scoring (kvtier/attention/keystore.py)
    credit: Literal["block", "request"] = "request"  # a request's full blocks share their mean score


@dataclass(frozen=True)
class MetricsConfig:
    prometheus_port: int | None = bounded(None, 1, 65535)
    log_interval_s: float = bounded(10.0, 0.0)


@dataclass(frozen=True, repr=False)
class PlacementIndexConfig:
    """A live index of the blocks on shared tiers, in Redis (kvtier/sharing.py); off while ``url`` is unset."""

    __repr__ = redacted_repr

    url: str | None = field(default=None, metadata={"url": True})
    password: str | None = field(default=None, repr=False, metadata={"secret": True})
    tls: bool = False
    tls_ca_file: str | None = None
    key_prefix: str = "kvtier"  # every engine sharing the tiers uses the same prefix and tier names
    timeout_s: float = bounded(0.05, 0.001, 10.0)  # a lookup waits at most this, then counts as a miss


@dataclass(frozen=True)
class AuthConfig:
    """Keyed authentication of stored records (kvtier/codecs/record.py). The key itself is never part of the
    config: it is read at start-up from ``key_file`` if set, else from the environment variable ``key_env``."""

    key_file: str | None = None
    key_env: str = "KVTIER_AUTH_KEY"
    tiers: Literal["shared", "all", "none"] = "shared"  # which tiers sign and verify their records


@dataclass(frozen=True)
class KVTierConfig:
    tiers: tuple[TierConfig, ...]
    checksum: Literal["xxh3", "crc32"] = "xxh3"
    promote_on_hit: Literal[True, False, "always"] = True  # True: while promotions pay off (measured)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    placement_index: PlacementIndexConfig = field(default_factory=PlacementIndexConfig)

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
        top_keys = [f.name for f in dataclasses.fields(KVTierConfig)]
        merged = apply_env_overrides(data, os.environ if env is None else env, top_keys)
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
    return build_dataclass(KVTierConfig, rest, "", preset={"tiers": tiers})


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
    options = build_dataclass(tier_cls.Options, {k: v for k, v in raw.items() if k not in common}, path)
    codec = build_dataclass(CodecConfig, codec_raw, f"{path}.codec")
    policy = build_dataclass(PolicyConfig, policy_raw, f"{path}.policy")
    make_codec(codec, f"{path}.codec")  # unknown names, bad levels and bad parameters fail here, not at start-up
    make_policy(policy, f"{path}.policy")
    capacity = convert(raw["capacity"], Size, f"{path}.capacity")
    try:
        tier_cls.check_config(capacity, options)
    except ConfigError as exc:
        raise ConfigError(f"{path}.{exc}") from None
    return TierConfig(
        name=check_type(raw.get("name", kind.rpartition(":")[2].lower()), str, f"{path}.name"),
        kind=kind,
        capacity=capacity,
        codec=codec,
        policy=policy,
        options=options,
        write_through=check_type(raw.get("write_through", False), bool, f"{path}.write_through"),
    )
