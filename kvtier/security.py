"""Record authentication keys and the start-up warnings about shared storage that anyone could write to.

The key is read from ``auth.key_file`` if set, else from the environment variable ``auth.key_env``
(``KVTIER_AUTH_KEY``); it is never part of the config object, a log line, a repr or ``validate --json``. Its
bytes are stretched into a 32-byte BLAKE2b key. ``auth.tiers`` picks the tiers that sign and verify: ``shared``
(S3, Redis: other writers can reach them), ``all`` or ``none``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from kvtier.errors import ConfigError
from kvtier.plugins import TIERS

if TYPE_CHECKING:
    from kvtier.config import AuthConfig, KVTierConfig, TierConfig

log = logging.getLogger("kvtier.security")
MIN_KEY_BYTES = 16


def load_auth_key(cfg: AuthConfig, env: Mapping[str, str] | None = None) -> bytes | None:
    """The record key, or None when none is configured. ConfigError names where a bad key came from."""
    env = os.environ if env is None else env
    if cfg.key_file:
        try:
            raw = Path(cfg.key_file).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"auth.key_file: cannot read {cfg.key_file} ({exc.strerror})") from None
        where = f"auth.key_file ({cfg.key_file})"
    elif env.get(cfg.key_env):
        raw, where = env[cfg.key_env].strip().encode(), f"${cfg.key_env} (auth.key_env)"
    else:
        return None
    if len(raw) < MIN_KEY_BYTES:
        raise ConfigError(f"{where}: the key must have at least {MIN_KEY_BYTES} bytes, it has {len(raw)}")
    return hashlib.blake2b(raw, digest_size=32, person=b"kvtier-authkey").digest()


def signs(cfg: KVTierConfig, tier: TierConfig) -> bool:
    """Whether ``tier`` signs and verifies its records when a key is set."""
    if cfg.auth.tiers == "all":
        return True
    return cfg.auth.tiers == "shared" and TIERS.resolve(tier.kind, "kind").shared


def security_warnings(cfg: KVTierConfig, key: bytes | None) -> list[str]:
    """What an operator should know about the shared tiers before trusting what they serve."""
    out: list[str] = []
    for tier in cfg.tiers:
        cls = TIERS.resolve(tier.kind, "kind")
        if cls.shared and (key is None or not signs(cfg, tier)):
            out.append(f"tier {tier.name!r} ({tier.kind}) is shared but its records are not authenticated: anyone "
                       f"who can write to it can plant KV for any prefix (set auth.key_file or ${cfg.auth.key_env})")
        out.extend(f"tier {tier.name!r} ({tier.kind}): {note}" for note in cls.transport_warnings(tier.options))
    if cfg.placement_index.url:
        redis_tier = TIERS.resolve("redis", "kind")
        out.extend(f"placement_index: {note}" for note in redis_tier.transport_warnings(cfg.placement_index))
    return out


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_of(url: str) -> str:
    """The host of a URL, without credentials or port (works on passwords holding any character)."""
    rest = url.partition("://")[2] or url
    authority = rest.rpartition("@")[2].split("/", 1)[0].split("?", 1)[0]
    if authority.startswith("["):
        return authority[:authority.find("]") + 1]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def log_warnings_once(cfg: KVTierConfig, key: bytes | None, seen: set[str] = set()) -> None:  # noqa: B006
    for warning in security_warnings(cfg, key):
        if warning not in seen:
            seen.add(warning)
            log.warning("kvtier: %s", warning)
