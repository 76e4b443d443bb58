"""Hostile and faulty storage never crashes kvtier, never serves planted KV, never loses blocks it evicted.

Each scenario plants or breaks something on a real backend (disk files, redis-server, SeaweedFS) and checks
what kvtier serves: a forged header asking for 2^40 bytes, records forged with a valid checksum, objects far
larger than any block, a malformed shared index, reads racing deletes, writes that fail after eviction, a
restart over capacity and a filesystem fuller than the tier's capacity.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest
import redis
from servers import S3_BUCKET, RedisServer
from tier_contract import make_key

from kvtier.codecs import HEADER_SIZE, BlockCodec, Lz4Codec, ZstdCodec, encode_record
from kvtier.config import CodecConfig, KVTierConfig
from kvtier.errors import ConfigError
from kvtier.security import load_auth_key, security_warnings
from kvtier.tiers.stack import TierStack

pytestmark = pytest.mark.server
BLOCK = 32 * 1024
KEY_A = b"K" * 32  # an auth key, as the environment would hold it


def forged_huge(key: bytes, codec_id: int, payload: bytes) -> bytes:
    """A record whose header is internally consistent (magic, crc) but claims 2^40 raw bytes."""
    head = struct.pack("<4sBBBBQQQ16s", b"KVTB", 1, codec_id, 0, 1, 1 << 40, len(payload), 0, key)
    return head + struct.pack("<II", zlib.crc32(head), 0) + payload


def stack_over(tier: dict[str, Any], raw_size: int | None = BLOCK, env: dict[str, str] | None = None,
               **top: Any) -> TierStack:
    cfg = KVTierConfig.from_dict({"tiers": [tier], **top}, env={})
    if env is not None:
        old = dict(os.environ)
        os.environ.update(env)
    try:
        stack = TierStack.from_config(cfg)
    finally:
        if env is not None:
            os.environ.clear()
            os.environ.update(old)
    stack.raw_size = raw_size
    return stack


def disk_spec(path: Path, **extra: Any) -> dict[str, Any]:
    return {"kind": "disk", "capacity": "64MiB", "path": str(path), **extra}


def s3_spec(server: Any, **extra: Any) -> dict[str, Any]:
    return {"kind": "s3", "capacity": 0, "bucket": S3_BUCKET, "prefix": f"integ-{uuid.uuid4().hex[:8]}",
            "endpoint_url": server.endpoint_url, "addressing_style": "path", "region": "us-east-1",
            "access_key_id": server.access_key, "secret_access_key": server.secret_key, **extra}


def redis_spec(server: Any, **extra: Any) -> dict[str, Any]:
    return {"kind": "redis", "capacity": 0, "url": server.url, "key_prefix": f"integ-{uuid.uuid4().hex[:8]}", **extra}


def plant(stack: TierStack, key: bytes, record: bytes) -> None:
    """Write raw bytes where the tier keeps ``key``'s record, behind kvtier's back (and index the key)."""
    tier: Any = stack.tiers[0]
    if tier.kind == "disk":
        path = tier.path_of(key)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(record)
    elif tier.kind == "s3":
        tier._client.put_object(Bucket=tier.bucket, Key=tier.object_name(key), Body=record)
    else:
        tier._client.set(tier.redis_key(key), record)
    tier.load_existing()


def present(stack: TierStack, key: bytes) -> bool:
    tier: Any = stack.tiers[0]
    if tier.kind == "disk":
        return tier.path_of(key).exists()
    if tier.kind == "s3":
        return any(True for _ in tier.entries() if _.key == key)
    return bool(tier._client.exists(tier.redis_key(key)))


@pytest.fixture(params=["disk", "s3", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "disk":
        return lambda **extra: disk_spec(tmp_path / "disk", **extra)
    server = request.getfixturevalue("seaweed_server" if request.param == "s3" else "redis_server")
    return (lambda **extra: s3_spec(server, **extra)) if request.param == "s3" else \
        (lambda **extra: redis_spec(server, **extra))


# ---- 1. forged headers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("codec_id", [Lz4Codec.codec_id, ZstdCodec.codec_id])
@pytest.mark.parametrize("raw_size", [BLOCK, None], ids=["engine", "no-block-size"])
def test_a_forged_huge_header_is_a_counted_miss_and_is_deleted(backend: Any, codec_id: int,
                                                              raw_size: int | None) -> None:
    stack = stack_over(backend(), raw_size=raw_size)
    key = make_key(f"forged-{codec_id}")
    plant(stack, key, forged_huge(key, codec_id, b"\x00" * 64))
    for _ in range(3):  # never raises, every time; the record is gone after the first
        assert stack.get(key) is None
    assert not present(stack, key)
    assert stack.metrics.snapshot()[stack.tiers[0].name]["checksum_failures"] == 1
    stack.close()


# ---- 4. keyed authentication ------------------------------------------------------------------------------

def test_a_forged_record_with_a_valid_checksum_is_refused_by_a_keyed_shared_tier(backend: Any) -> None:
    signed = stack_over(backend(), env={"KVTIER_AUTH_KEY": KEY_A.decode()}, auth={"tiers": "all"})
    raw = os.urandom(BLOCK)
    good, forged = make_key("signed"), make_key("forged")
    assert signed.put(good, raw) and signed.get(good) == (raw, signed.tiers[0].name)
    # Anyone with write access can build a perfectly checksummed record; without the key it has no MAC.
    plant(signed, forged, BlockCodec(CodecConfig(signed.tiers[0].codec.cfg.name)).encode(forged, os.urandom(BLOCK)))
    assert signed.get(forged) is None and not present(signed, forged)
    # A record signed with another key is refused too.
    other = BlockCodec(signed.tiers[0].codec.cfg, auth_key=load_auth_key(KVTierConfig.from_dict(
        {"tiers": [{"kind": "dram", "capacity": "1MiB"}]}, env={}).auth, {"KVTIER_AUTH_KEY": "another-key-0123456789"}))
    plant(signed, forged, other.encode(forged, raw))
    assert signed.get(forged) is None
    assert signed.metrics.snapshot()[signed.tiers[0].name]["checksum_failures"] == 2
    signed.close()


def test_shared_tiers_sign_by_default_when_a_key_is_set_and_warn_when_not(redis_server: Any,
                                                                          seaweed_server: Any) -> None:
    cfg = KVTierConfig.from_dict({"tiers": [{"kind": "dram", "capacity": "1MiB"}, s3_spec(seaweed_server),
                                            redis_spec(redis_server)]}, env={})
    key = load_auth_key(cfg.auth, {"KVTIER_AUTH_KEY": KEY_A.decode()})
    assert key is not None and KEY_A not in key
    assert security_warnings(cfg, key) == []  # loopback servers, records signed
    unsigned = security_warnings(cfg, None)
    assert len(unsigned) == 2 and all("not authenticated" in w for w in unsigned)
    with pytest.raises(ConfigError, match=r"\$KVTIER_AUTH_KEY \(auth.key_env\): the key must have at least 16"):
        load_auth_key(cfg.auth, {"KVTIER_AUTH_KEY": "short"})


def test_remote_servers_without_tls_or_auth_are_named_at_start_up() -> None:
    cfg = KVTierConfig.from_dict({"tiers": [
        {"kind": "s3", "capacity": 0, "bucket": "kv-b", "endpoint_url": "http://10.1.2.3:8333"},
        {"kind": "redis", "capacity": 0, "url": "redis://cache.internal:6379/0"},
        {"kind": "redis", "name": "r2", "capacity": 0, "url": "rediss://:s3cr/t@cache.internal:6380/0"},
        {"kind": "s3", "name": "aws", "capacity": 0, "bucket": "kv-c"},
        {"kind": "s3", "name": "local", "capacity": 0, "bucket": "kv-d", "endpoint_url": "http://127.0.0.1:8333"}]},
        env={})
    warnings = [w for w in security_warnings(cfg, b"k" * 32)]
    assert any("'s3'" in w and "without TLS" in w and "10.1.2.3" in w for w in warnings)
    assert any("'redis'" in w and "without TLS" in w for w in warnings)
    assert any("'redis'" in w and "without a password" in w for w in warnings)
    assert not any("'r2'" in w or "'aws'" in w or "'local'" in w for w in warnings)
    assert not any("s3cr" in w for w in warnings)


# ---- 5. unbounded reads -----------------------------------------------------------------------------------

def test_an_object_far_larger_than_any_record_is_refused_unread(backend: Any) -> None:
    stack = stack_over(backend())
    key = make_key("huge-object")
    plant(stack, key, os.urandom(1024) * (16 * 1024))  # 16 MiB where a block record is ~33 KiB
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert stack.get(key) is None
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 8 * 1024, f"peak RSS grew {grown_kib} KiB reading a refused object"
    assert not present(stack, key)
    stack.close()


def test_a_compression_bomb_is_refused_before_decoding(backend: Any) -> None:
    stack = stack_over(backend(codec="zstd"))
    key = make_key("bomb")
    bomb = encode_record(key, bytes(64 << 20), ZstdCodec(3))  # 64 MiB of zeros in a few KiB: a valid record
    assert len(bomb) < 64 * 1024
    plant(stack, key, bomb)
    start = time.perf_counter()
    assert stack.get(key) is None
    assert time.perf_counter() - start < 0.5
    stack.close()


# ---- 10. reads racing deletes -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["s3", "redis"])
def test_a_read_racing_a_delete_never_leaves_a_phantom_entry(kind: str, request: pytest.FixtureRequest) -> None:
    server = request.getfixturevalue("seaweed_server" if kind == "s3" else "redis_server")
    stack = stack_over(s3_spec(server) if kind == "s3" else redis_spec(server))
    tier: Any = stack.tiers[0]
    record = tier.codec.encode(b"r" * 16, os.urandom(BLOCK))
    phantoms = 0
    for i in range(120 if kind == "s3" else 400):
        key = make_key(f"race-{i}")
        tier.put(key, tier.codec.encode(key, os.urandom(BLOCK)) if i % 50 == 0 else record.replace(b"r" * 16, key))
        reader = threading.Thread(target=tier.get, args=(key,))
        reader.start()
        tier.delete(key)
        reader.join()
        if tier.contains(key) and not present(stack, key):
            phantoms += 1
    assert phantoms == 0
    stack.close()


# ---- 11. a malformed shared index -------------------------------------------------------------------------

def test_malformed_shared_index_entries_are_ignored_and_counted(redis_server: Any) -> None:
    spec = redis_spec(redis_server, shared_index=True, capacity="1MiB")
    writer = stack_over(spec)
    key = make_key("real")
    assert writer.put(key, os.urandom(BLOCK))
    client = redis.Redis.from_url(redis_server.url)
    index = f"{spec['key_prefix']}:index:redis"
    client.hset(index, mapping={make_key("nan"): "not-a-number", make_key("neg"): "-1099511627776",
                                make_key("huge"): str(1 << 62), b"short": "100"})
    for bad in (make_key("nan"), make_key("neg"), make_key("huge")):
        client.set(f"{spec['key_prefix']}:b:{bad.hex()}", b"x")
    reader = stack_over(spec)  # start-up listing through the index: no crash
    tier: Any = reader.tiers[0]
    assert tier.contains(key) and tier.malformed_entries == 4
    assert 0 < tier.used_bytes <= tier.capacity
    assert reader.get(key) is not None
    client.close()
    writer.close()
    reader.close()


# ---- 8. a write that fails after evicting ------------------------------------------------------------------

def test_victims_of_a_failed_write_are_still_demoted(tmp_path: Path) -> None:
    with_memory = RedisServer(tmp_path / "redis", maxmemory="8mb")
    (tmp_path / "redis").mkdir()
    with_memory.start()
    try:
        cfg = KVTierConfig.from_dict({"tiers": [
            {"kind": "redis", "capacity": 4 * (BLOCK + 4096), "url": with_memory.url, "codec": "none"},
            {"kind": "disk", "capacity": "64MiB", "path": str(tmp_path / "disk"), "codec": "none"}]}, env={})
        stack = TierStack.from_config(cfg)
        stack.raw_size = BLOCK
        blocks = {make_key(i): os.urandom(BLOCK) for i in range(4)}
        for key, raw in blocks.items():
            assert stack.put(key, raw) and stack.where(key) == "redis"
        # Redis now refuses every write (out of memory); the next put evicts a victim before its SET fails.
        redis.Redis.from_url(with_memory.url).config_set("maxmemory", "1")
        new = make_key("new")
        blocks[new] = os.urandom(BLOCK)
        assert stack.put(new, blocks[new])  # refused by redis, stored on disk
        for key, raw in blocks.items():
            assert stack.get(key) == (raw, stack.where(key) or "?"), f"block {key.hex()} was lost"
        assert stack.metrics.snapshot()["redis"]["demotions"] >= 1
        stack.close()
    finally:
        with_memory.stop()


# ---- 9. restart over capacity ------------------------------------------------------------------------------

def test_a_disk_restart_over_capacity_keeps_the_newest_blocks(tmp_path: Path) -> None:
    spec = disk_spec(tmp_path / "disk", capacity="1MiB", codec="none")
    first = stack_over(spec)
    keys = [make_key(f"age-{i}") for i in range(24)]
    now = time.time()
    for i, key in enumerate(keys):
        assert first.put(key, os.urandom(BLOCK))
        os.utime(first.tiers[0].path_of(key), (now - 1000 + i, now - 1000 + i))  # type: ignore[attr-defined]
    first.close()
    smaller = stack_over({**spec, "capacity": 8 * (BLOCK + HEADER_SIZE)})
    kept = [k for k in keys if smaller.tiers[0].contains(k)]
    assert kept == keys[-8:]
    smaller.close()


# ---- 15. a filesystem fuller than the tier's capacity -------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path: Path) -> Any:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.system(f"mount -t tmpfs -o size=4m tmpfs {mount} 2>/dev/null") != 0:
        pytest.skip("no tmpfs mount here (needs CAP_SYS_ADMIN); tests/test_faults.py covers RLIMIT_FSIZE")
    yield mount
    os.system(f"umount {mount}")


def test_a_full_filesystem_lowers_the_effective_capacity_instead_of_failing_every_write(small_fs: Path) -> None:
    stack = stack_over(disk_spec(small_fs, capacity="64MiB", codec="none"))
    tier: Any = stack.tiers[0]
    data = {}
    failures = 0
    for i in range(400):  # 400 x 33 KiB into 4 MiB (64 MiB configured)
        key = make_key(f"fill-{i}")
        data[key] = os.urandom(BLOCK)
        failures += not stack.put(key, data[key])
    assert failures <= 5, f"{failures} writes failed: ENOSPC never led to eviction"
    assert tier.capacity < 4 << 20 and tier.used_bytes <= tier.capacity
    assert all(stack.get(k) == (v, "disk") for k, v in data.items() if tier.contains(k))
    assert sum(tier.contains(k) for k in data) > 50
    stack.close()
