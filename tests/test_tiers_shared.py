"""S3Tier and RedisTier against real servers (weed mini, redis-server on 127.0.0.1).

The Tier contract runs against both; then what sharing adds: a second instance finds what the first stored,
corrupt objects are caught by the record checksum, a killed server turns into fast misses and the tier heals
when it returns, two processes writing the same keys never produce a torn block, and misconfiguration fails at
start-up with a message naming the setting.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from servers import S3_BUCKET, RedisServer, SeaweedServer
from tier_contract import CAPACITY, TierContract, make_key, make_record

from kvtier.codecs import BlockCodec
from kvtier.config import CodecConfig
from kvtier.tiers.redis import RedisOptions
from kvtier.tiers.s3 import S3Options
from kvtier.errors import CorruptBlockError, TierError, TierFullError
from kvtier.policies.lru import LRUPolicy
from kvtier.tiers.breaker import CircuitBreaker, CircuitOpenError
from kvtier.tiers.redis import RedisPrefixIndex, RedisTier
from kvtier.tiers.s3 import S3Tier
from kvtier.tiers.shared import SharedTier

pytestmark = pytest.mark.server
CODEC = BlockCodec(CodecConfig())
TierFactory = Callable[..., SharedTier]


def s3_options(server: SeaweedServer, **changes: Any) -> S3Options:
    base = S3Options(bucket=S3_BUCKET, prefix=f"t-{uuid.uuid4().hex[:8]}", endpoint_url=server.endpoint_url,
                     region="us-east-1", addressing_style="path", access_key_id=server.access_key,
                     secret_access_key=server.secret_key, connect_timeout_s=1.0, save_timeout_s=3.0, retries=1)
    return dataclasses.replace(base, **changes)


def redis_options(server: RedisServer, **changes: Any) -> RedisOptions:
    base = RedisOptions(url=server.url, key_prefix=f"t-{uuid.uuid4().hex[:8]}", load_timeout_s=1.0)
    return dataclasses.replace(base, **changes)


def open_tier(options: S3Options | RedisOptions, capacity: int = 0) -> SharedTier:
    cls = S3Tier if isinstance(options, S3Options) else RedisTier
    return cls("shared", capacity, CODEC, LRUPolicy(), options)  # type: ignore[arg-type]


# ---- the contract -----------------------------------------------------------------------------------------
class TestS3TierContract(TierContract):
    RECORD_SIZE = 48 * 1024
    THREAD_ROUNDS = 20

    @pytest.fixture
    def tier(self, seaweed_server: SeaweedServer) -> Iterator[SharedTier]:
        tier = open_tier(s3_options(seaweed_server), CAPACITY)
        yield tier
        tier.close()


class TestRedisTierContract(TierContract):
    @pytest.fixture
    def tier(self, redis_server: RedisServer) -> Iterator[SharedTier]:
        tier = open_tier(redis_options(redis_server), CAPACITY)
        yield tier
        tier.close()


# ---- sharing, batches, corruption: run on both backends ---------------------------------------------------
@pytest.fixture(params=["s3", "redis"])
def backend(request: pytest.FixtureRequest) -> tuple[str, Any, Any]:
    """(kind, server, options) with a fresh prefix; each test opens the tiers it needs."""
    if request.param == "s3":
        server = request.getfixturevalue("seaweed_server")
        return "s3", server, s3_options(server)
    server = request.getfixturevalue("redis_server")
    return "redis", server, redis_options(server)


def overwrite_raw(kind: str, tier: SharedTier, key: bytes, data: bytes) -> None:
    """Replace a stored object behind the tier's back, with the backend's own client."""
    if kind == "s3":
        assert isinstance(tier, S3Tier)
        tier._client.put_object(Bucket=tier.bucket, Key=tier.object_name(key), Body=data)
    else:
        assert isinstance(tier, RedisTier)
        tier._client.set(tier.redis_key(key), data)


def test_second_instance_finds_what_the_first_stored(backend: tuple[str, Any, Any]) -> None:
    _, _, options = backend
    first, second = open_tier(options), open_tier(options)
    keys = [make_key(f"share{i}") for i in range(5)]
    records = {k: make_record(k, 10_000 + i) for i, k in enumerate(keys)}
    for key in keys:
        assert first.put(key, records[key]) == []  # capacity 0: unbounded, never evicts
    # The lookup path stays local: the second instance does not know yet...
    assert not second.contains(keys[0])
    # ...but a get still asks the backend, and adopts the key on a hit.
    assert second.get(keys[0]) == records[keys[0]] and second.contains(keys[0])
    # refresh_index lists the prefix and adopts the rest.
    assert second.refresh_index() == 4
    assert sorted(second.keys()) == sorted(keys) and second.used_bytes == first.used_bytes
    # A key deleted by the first instance is forgotten by the second on its next refresh (or read).
    assert first.delete(keys[1]) is True
    second.refresh_index()
    assert not second.contains(keys[1]) and second.get(keys[1]) is None
    first.close()
    second.close()


def test_batches_keep_order_and_report_misses(backend: tuple[str, Any, Any]) -> None:
    _, _, options = backend
    tier = open_tier(options)
    items = [(make_key(f"b{i}"), make_record(make_key(f"b{i}"), 20_000 + i)) for i in range(40)]
    result = tier.put_many(items)
    assert result.ok and result.victims == [] and len(tier) == 40
    wanted = [items[3][0], make_key("absent"), items[39][0], items[0][0]]
    assert tier.get_many(wanted) == [items[3][1], None, items[39][1], items[0][1]]
    tier.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_key"])
def test_damaged_object_fails_verification(backend: tuple[str, Any, Any], damage: str) -> None:
    kind, _, options = backend
    tier = open_tier(options)
    key = make_key("victim")
    record = CODEC.encode(key, b"\x01" * 50_000)
    tier.put(key, record)
    bad = {"garbage": b"\x5a" * len(record), "truncated": record[: len(record) // 2],
           "other_key": CODEC.encode(make_key("other"), b"\x01" * 50_000)}[damage]
    overwrite_raw(kind, tier, key, bad)
    stored = tier.get(key)
    assert stored == bad  # the tier returns bytes; the record check is what refuses them
    with pytest.raises(CorruptBlockError):
        CODEC.decode(key, stored)
    tier.close()


# ---- faults ----------------------------------------------------------------------------------------------
def test_killed_server_fails_fast_and_recovers(backend: tuple[str, Any, Any]) -> None:
    kind, server, options = backend
    tier = open_tier(options)
    key = make_key("fault")
    record = make_record(key, 100_000)
    tier.put(key, record)
    server.stop()  # SIGKILL, like a crash
    try:
        start = time.monotonic()
        with pytest.raises(TierError):
            tier.put(make_key("fault2"), record)
        assert time.monotonic() - start < 3.0
        # The breaker is open now: further calls fail without touching the network.
        start = time.monotonic()
        for _ in range(50):
            assert tier.get(key) is None
            with pytest.raises(TierError):
                tier.put(key, record)
        assert time.monotonic() - start < 0.5
        assert tier.breaker.is_open
    finally:
        server.start()
    if kind == "s3":
        server.ensure_bucket(S3_BUCKET)
    # Back up: within the breaker's window (it doubled at most a few times) calls succeed again.
    deadline = time.monotonic() + 30
    while True:
        try:
            tier.put(key, record)
            break
        except TierError:
            assert time.monotonic() < deadline, "tier did not recover after the server came back"
            time.sleep(0.2)
    assert tier.get(key) == record and not tier.breaker.is_open
    tier.close()


def _mp_writer(options: S3Options | RedisOptions, keys: list[bytes], fill: int, rounds: int) -> None:
    tier = open_tier(options)
    for _ in range(rounds):
        for key in keys:
            tier.put(key, CODEC.encode(key, bytes([fill]) * 300_000))
    tier.close()


def test_two_processes_never_tear_a_block(backend: tuple[str, Any, Any]) -> None:
    _, _, options = backend
    keys = [make_key(f"mp{i}") for i in range(4)]
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_mp_writer, args=(options, keys, fill, 8)) for fill in (0xA1, 0xB2)]
    for proc in writers:
        proc.start()
    reader = open_tier(options)
    seen: set[int] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (any(p.is_alive() for p in writers) or not seen):
        for key, record in zip(keys, reader.get_many(keys)):
            if record is None:
                continue  # not written yet
            raw = CODEC.decode(key, record)  # raises CorruptBlockError on a torn or mixed record
            assert raw in (b"\xa1" * 300_000, b"\xb2" * 300_000)
            seen.add(raw[0])
    for proc in writers:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert seen  # every record read decoded to exactly one writer's full block
    reader.close()


# ---- start-up errors ------------------------------------------------------------------------------------
def test_s3_missing_bucket_names_the_setting(seaweed_server: SeaweedServer) -> None:
    with pytest.raises(TierError, match=r"bucket 'kvtier-absent' does not exist at http://127.0.0.1:\d+.*'bucket'"):
        open_tier(s3_options(seaweed_server, bucket="kvtier-absent"))
    name = f"kvtier-made-{uuid.uuid4().hex[:6]}"
    tier = open_tier(s3_options(seaweed_server, bucket=name, create_bucket=True))
    tier.put(make_key("x"), b"record")
    assert tier.get(make_key("x")) == b"record"
    tier.close()


def test_s3_wrong_credentials_say_so_without_the_secret(seaweed_server: SeaweedServer) -> None:
    secret = "not-the-secret-4c8a1f"
    with pytest.raises(TierError, match="access denied.*access_key_id") as info:
        open_tier(s3_options(seaweed_server, secret_access_key=secret))
    assert secret not in str(info.value)
    tier = open_tier(s3_options(seaweed_server))
    assert seaweed_server.secret_key not in repr(tier)
    tier.close()


def test_unreachable_servers_fail_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(TierError, match="cannot reach S3 endpoint http://127.0.0.1:1 .*endpoint_url"):
        S3Tier("s3", 0, CODEC, LRUPolicy(), S3Options(bucket="b-x", endpoint_url="http://127.0.0.1:1",
                                                      access_key_id="a", secret_access_key="b", retries=0))
    with pytest.raises(TierError, match="cannot connect to Redis at redis://127.0.0.1:1/0"):
        RedisTier("r", 0, CODEC, LRUPolicy(), RedisOptions(url="redis://127.0.0.1:1/0"))


def test_redis_wrong_password(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="right-pass-91")
    server.start()
    try:
        for options in (RedisOptions(url=server.url, password="wrong-pass-17"),
                        RedisOptions(url=server.url.replace("redis://", "redis://:wrong-pass-17@"))):
            with pytest.raises(TierError, match="authentication failed.*'password'") as info:
                RedisTier("r", 0, CODEC, LRUPolicy(), options)
            assert "wrong-pass-17" not in str(info.value)
        tier = RedisTier("r", 0, CODEC, LRUPolicy(), RedisOptions(url=server.url, password="right-pass-91"))
        assert "right-pass-91" not in repr(tier)
        tier.put(make_key("p"), b"ok")
        assert tier.get(make_key("p")) == b"ok"
        tier.close()
    finally:
        server.stop()


# ---- Redis specifics -------------------------------------------------------------------------------------
def test_redis_out_of_memory_is_tier_full_not_a_crash(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, maxmemory="4mb")
    server.start()
    try:
        tier = RedisTier("r", 0, CODEC, LRUPolicy(), RedisOptions(url=server.url))
        stored: dict[bytes, bytes] = {}
        with pytest.raises(TierFullError, match="maxmemory"):
            for i in range(100):
                key = make_key(f"oom{i}")
                stored[key] = make_record(key, 256 * 1024)
                tier.put(key, stored[key])
        stored.pop(key)
        assert not tier.contains(key)
        assert all(tier.get(k) == v for k, v in stored.items())  # nothing already stored was lost
        result = tier.put_many([(make_key("more"), make_record(make_key("more"), 256 * 1024))])
        assert isinstance(result.failed[make_key("more")], TierFullError)
        tier.close()
    finally:
        server.stop()


def test_redis_ttl_expiry_is_a_forgotten_miss(redis_server: RedisServer) -> None:
    tier = open_tier(redis_options(redis_server, ttl_s=1))
    key = make_key("ttl")
    tier.put(key, b"short-lived")
    assert tier.get(key) == b"short-lived"
    time.sleep(1.3)
    assert tier.get(key) is None and not tier.contains(key) and tier.used_bytes == 0
    tier.close()


def test_shared_index_tells_instances_what_others_stored(redis_server: RedisServer) -> None:
    options = redis_options(redis_server, shared_index=True)
    first, second = open_tier(options), open_tier(options)
    keys = [make_key(f"ix{i}") for i in range(3)]
    first.put_many([(k, b"r" * (i + 1)) for i, k in enumerate(keys)])
    assert second.refresh_index() == 3 and second.used_bytes == 6
    index = RedisPrefixIndex(redis.Redis.from_url(redis_server.url), options.key_prefix)
    index.add([keys[0]], "disk-of-host-b", [100])
    assert index.which([keys[0], keys[1], make_key("none")]) == {keys[0]: ["disk-of-host-b", "shared"],
                                                                    keys[1]: ["shared"]}
    first.delete(keys[1])
    index.remove([keys[0]])
    assert index.which(keys) == {keys[2]: ["shared"]}
    # An entry whose block expired (or was evicted by the server) is pruned when a tier lists the index.
    redis.Redis.from_url(redis_server.url).delete(first.redis_key(keys[2]))  # type: ignore[attr-defined]
    third = open_tier(options)
    assert third.refresh_index() == 0 and index.which(keys) == {}
    third.close()
    first.close()
    second.close()


# ---- the breaker itself ----------------------------------------------------------------------------------
def test_breaker_backs_off_doubling_and_probes_once() -> None:
    now = [0.0]
    breaker = CircuitBreaker("t", initial_s=1.0, max_s=4.0, clock=lambda: now[0])
    breaker.check()
    breaker.record_failure("refused")
    with pytest.raises(CircuitOpenError, match="refused"):
        breaker.check()
    now[0] = 1.0
    breaker.check()  # the one probe after the window
    with pytest.raises(CircuitOpenError):
        breaker.check()  # everyone else still fails fast while it runs
    for expected in (2.0, 4.0, 4.0):  # probe failures double the window, up to max_s
        breaker.record_failure("refused")
        now[0] += expected - 0.01
        with pytest.raises(CircuitOpenError):
            breaker.check()
        now[0] += 0.01
        breaker.check()
    breaker.record_success()
    assert not breaker.is_open
    breaker.check()
