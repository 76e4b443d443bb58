"""Build a Tier from its TierConfig. Shared-storage tiers are imported lazily."""

from __future__ import annotations

from kvtier.codecs import BlockCodec
from kvtier.config import TierConfig
from kvtier.policies import make_policy
from kvtier.tiers.base import Tier


def make_tier(cfg: TierConfig, checksum_alg: str = "xxh3", path: str = "tiers") -> Tier:
    codec = BlockCodec(cfg.codec, checksum_alg)
    policy = make_policy(cfg.policy, f"{path}.policy")
    if cfg.kind == "dram":
        from kvtier.tiers.dram import DramTier
        return DramTier(cfg.name, cfg.capacity, codec, policy, cfg.options)  # type: ignore[arg-type]
    if cfg.kind == "disk":
        from kvtier.tiers.disk import DiskTier
        return DiskTier(cfg.name, cfg.capacity, codec, policy, cfg.options)  # type: ignore[arg-type]
    if cfg.kind == "s3":
        from kvtier.tiers.s3 import S3Tier
        return S3Tier(cfg.name, cfg.capacity, codec, policy, cfg.options)  # type: ignore[arg-type]
    from kvtier.tiers.redis import RedisTier
    return RedisTier(cfg.name, cfg.capacity, codec, policy, cfg.options)  # type: ignore[arg-type]
