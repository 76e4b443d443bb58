"""Build a Tier from its TierConfig: the class its kind names (kvtier.plugins.TIERS), codec and policy."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvtier.codecs import BlockCodec
from kvtier.plugins import TIERS
from kvtier.policies import make_policy
from kvtier.tiers.base import Tier

if TYPE_CHECKING:
    from kvtier.config import KVTierConfig, TierConfig


def make_tier(cfg: TierConfig, checksum_alg: str = "xxh3", path: str = "tiers",
              auth_key: bytes | None = None) -> Tier:
    """``auth_key``: sign and verify this tier's records with it (kvtier/security.py decides which tiers)."""
    cls = TIERS.resolve(cfg.kind, f"{path}.kind")
    codec = BlockCodec(cfg.codec, checksum_alg, auth_key)
    policy = make_policy(cfg.policy, f"{path}.policy")
    return cls(cfg.name, cfg.capacity, codec, policy, cfg.options)  # type: ignore[no-any-return]


def make_tiers(cfg: KVTierConfig) -> list[Tier]:
    """Every tier of ``cfg``, fastest first, each with what its storage already holds (``load_existing``); the
    auth key signs the tiers kvtier/security.py says. On any failure the tiers built so far are closed."""
    from kvtier.security import load_auth_key, log_warnings_once, signs

    key = load_auth_key(cfg.auth)
    log_warnings_once(cfg, key)
    tiers: list[Tier] = []
    try:
        for i, t in enumerate(cfg.tiers):
            tiers.append(make_tier(t, cfg.checksum, f"tiers[{i}]", key if signs(cfg, t) else None))
        for tier in tiers:
            tier.load_existing()
    except BaseException:
        for tier in tiers:
            tier.close()
        raise
    return tiers
