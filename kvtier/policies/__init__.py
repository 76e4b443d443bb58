"""Eviction policies, loaded by registered name or by ``module:Class`` (kvtier.plugins.POLICIES)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvtier.errors import ConfigError
from kvtier.plugins import POLICIES
from kvtier.policies.base import EvictionPolicy

if TYPE_CHECKING:
    from kvtier.config import PolicyConfig

__all__ = ["EvictionPolicy", "make_policy", "POLICY_NAMES"]

POLICY_NAMES = tuple(POLICIES.names())


def make_policy(cfg: PolicyConfig, path: str = "policy") -> EvictionPolicy:
    cls = POLICIES.resolve(cfg.name, f"{path}.name")
    try:
        return cls(**dict(cfg.params))  # type: ignore[no-any-return]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
