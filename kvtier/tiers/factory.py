"""Build a Tier from its TierConfig: the class its kind names (kvtier.plugins.TIERS), codec and policy."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvtier.codecs import BlockCodec
from kvtier.plugins import TIERS
from kvtier.policies import make_policy
from kvtier.tiers.base import Tier

if TYPE_CHECKING:
    from kvtier.config import TierConfig


def make_tier(cfg: TierConfig, checksum_alg: str = "xxh3", path: str = "tiers",
              auth_key: bytes | None = None) -> Tier:
    """``auth_key``: sign and verify this tier's records with it (kvtier/security.py decides which tiers)."""
    cls = TIERS.resolve(cfg.kind, f"{path}.kind")
    codec = BlockCodec(cfg.codec, checksum_alg, auth_key)
    policy = make_policy(cfg.policy, f"{path}.policy")
    return cls(cfg.name, cfg.capacity, codec, policy, cfg.options)  # type: ignore[no-any-return]
