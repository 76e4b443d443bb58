"""Every plug-in point opens the same way: a tier kind, a codec and a policy named ``module:Class`` in a config
work without any change to kvtier, and registered names resolve to their classes."""

from __future__ import annotations

import os

import pytest
from plugin_kinds import DictTier, ZlibCodec

from kvtier.codecs import BlockCodec
from kvtier.config import CodecConfig, KVTierConfig
from kvtier.errors import ConfigError
from kvtier.plugins import CODECS, POLICIES, TIERS
from kvtier.tiers.stack import TierStack

CUSTOM = {"kind": "plugin_kinds:DictTier", "capacity": "64KiB", "max_records": 10,
          "codec": {"name": "plugin_kinds:ZlibCodec", "level": 1}, "policy": "kvtier.policies.arc:ARCPolicy"}


def test_a_tier_kind_codec_and_policy_from_outside_kvtier_store_and_serve_blocks() -> None:
    # 1. The config names the custom tier kind and codec; their options are validated like built-ins'.
    cfg = KVTierConfig.from_dict({"tiers": [CUSTOM]}, env={})
    assert cfg.tiers[0].options.max_records == 10 and cfg.tiers[0].name == "dicttier"
    # 2. A stack over it stores, evicts and serves verified blocks.
    stack = TierStack.from_config(cfg)
    tier = stack.tiers[0]
    assert isinstance(tier, DictTier) and isinstance(tier.codec.codec, ZlibCodec)
    blocks = {bytes([i]) * 16: os.urandom(8192) for i in range(20)}  # incompressible: 64 KiB holds 7
    for key, raw in blocks.items():
        assert stack.put(key, raw)
    held = [k for k in blocks if tier.contains(k)]
    assert 0 < len(held) < 20 and tier.used_bytes <= tier.capacity
    assert all(stack.get(k) == (blocks[k], "dicttier") for k in held)


def test_custom_options_and_codec_settings_fail_at_validation_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.max_records: must be positive"):
        KVTierConfig.from_dict({"tiers": [{**CUSTOM, "max_records": 0}]}, env={})
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.colour: unknown key for a plugin_kinds:DictTier tier"):
        KVTierConfig.from_dict({"tiers": [{**CUSTOM, "colour": "red"}]}, env={})
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.codec\.level: zlib: level must be 0\.\.9"):
        KVTierConfig.from_dict({"tiers": [{**CUSTOM, "codec": {"name": "plugin_kinds:ZlibCodec", "level": 42}}]},
                               env={})
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.kind: .*is not a Tier subclass"):
        KVTierConfig.from_dict({"tiers": [{**CUSTOM, "kind": "plugin_kinds:ZlibCodec"}]}, env={})
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.codec\.name: cannot load codec 'plugin_kinds:Nope'"):
        KVTierConfig.from_dict({"tiers": [{**CUSTOM, "codec": "plugin_kinds:Nope"}]}, env={})


def test_a_codec_may_not_take_a_built_in_codec_id() -> None:
    class Impostor(ZlibCodec):
        codec_id = 1  # lz4's

    CODECS.register("impostor", Impostor)
    with pytest.raises(ConfigError, match="reuses codec id 1 of the built-in 'lz4'"):
        BlockCodec(CodecConfig("impostor"))


def test_registered_names_resolve_to_their_classes() -> None:
    assert TIERS.resolve("disk", "k").__name__ == "DiskTier" and TIERS.resolve("redis", "k").kind == "redis"
    assert CODECS.resolve("zstd", "k").name == "zstd" and POLICIES.resolve("arc", "k").name == "arc"
    TIERS.register("dict", DictTier)
    assert KVTierConfig.from_dict({"tiers": [{**CUSTOM, "kind": "dict"}]}, env={}).tiers[0].name == "dict"
    with pytest.raises(ConfigError, match=r"x: unknown tier kind 'floppy'; expected one of \[.*'dict'"):
        TIERS.resolve("floppy", "x")
