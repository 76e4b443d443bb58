"""Eviction policies, loaded by registered name or by ``module:Class``."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from kvtier.config import PolicyConfig
from kvtier.errors import ConfigError
from kvtier.policies.base import EvictionPolicy

__all__ = ["EvictionPolicy", "make_policy", "POLICY_NAMES"]

_REGISTRY: dict[str, str] = {
    "lru": "kvtier.policies.lru:LRUPolicy",
    "lfu": "kvtier.policies.lfu:LFUPolicy",
    "arc": "kvtier.policies.arc:ARCPolicy",
    "attention": "kvtier.policies.attention:AttentionPolicy",
}
POLICY_NAMES = tuple(_REGISTRY)


def _load(ref: str, path: str) -> Callable[..., EvictionPolicy]:
    module_name, _, attr = ref.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{path}: cannot load policy {ref!r} ({exc}); use one of {list(POLICY_NAMES)} "
                          "or 'package.module:ClassName' of an importable EvictionPolicy subclass") from exc
    if not (isinstance(cls, type) and issubclass(cls, EvictionPolicy)):
        raise ConfigError(f"{path}: {ref!r} is not an EvictionPolicy subclass")
    return cls


def make_policy(cfg: PolicyConfig, path: str = "policy") -> EvictionPolicy:
    if cfg.name in _REGISTRY:
        ref = _REGISTRY[cfg.name]
    elif ":" in cfg.name:
        ref = cfg.name
    else:
        raise ConfigError(f"{path}.name: unknown policy {cfg.name!r}; expected one of {list(POLICY_NAMES)} "
                          "or 'package.module:ClassName'")
    cls = _load(ref, f"{path}.name")
    try:
        return cls(**dict(cfg.params))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
