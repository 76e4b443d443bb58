"""The live placement index (kvtier/sharing.py) on a real redis-server and SeaweedFS: what one engine's shared
tiers store is found by another engine's scheduler in one round trip; entries of blocks that are gone are
cleaned up on the miss; a frozen or dead index costs a bounded wait once, then nothing."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from servers import S3_BUCKET, RedisServer

from kvtier.config import KVTierConfig, PlacementIndexConfig
from kvtier.connector.metadata import KVTierMetadata
from kvtier.connector.scheduler import SchedulerSide
from kvtier.connector.worker import WorkerSide
from kvtier.keys import ModelFingerprint, block_keys
from kvtier.sharing import SharedPlacement

pytestmark = pytest.mark.server
BS = 4
FP = ModelFingerprint(model="m", block_size=BS)


@pytest.fixture
def index(tmp_path: Path) -> Any:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def config(seaweed: Any, index_url: str, prefix: str) -> KVTierConfig:
    return KVTierConfig.from_dict({"tiers": [
        {"kind": "dram", "capacity": "1MiB"},
        {"kind": "s3", "capacity": 0, "bucket": S3_BUCKET, "prefix": prefix, "write_through": True,
         "endpoint_url": seaweed.endpoint_url, "addressing_style": "path", "region": "us-east-1",
         "access_key_id": seaweed.access_key, "secret_access_key": seaweed.secret_key}],
        "placement_index": {"url": index_url, "key_prefix": prefix}}, env={})


def worker(cfg: KVTierConfig) -> WorkerSide:
    import torch

    side = WorkerSide(cfg, 32)
    side.register_kv_caches({"l0": torch.zeros(32, 2, BS, 16, dtype=torch.bfloat16)})
    return side


def request(rid: str, tokens: list[int]) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(request_id=rid, all_token_ids=tokens, num_tokens=len(tokens), num_prompt_tokens=len(tokens),
                           num_output_tokens=0, cache_salt=None, mm_features=None)


def test_blocks_another_engine_stores_are_hits_at_once_and_gone_ones_are_cleaned_up(seaweed_server: Any,
                                                                                  index: Any) -> None:
    prefix = f"share-{uuid.uuid4().hex[:8]}"
    cfg = config(seaweed_server, index.url, prefix)
    later = SchedulerSide(cfg, FP, BS)  # engine B's scheduler, up before anything was stored
    tokens = list(range(1, 18))
    keys = block_keys(FP, tokens, BS)
    assert later.get_num_new_matched_tokens(request("b0", tokens), 0) == (0, False)
    # Engine A's worker saves the four blocks; its S3 tier publishes them.
    a = worker(cfg)
    a.wait_for_save(KVTierMetadata(saves=[(k, i + 1) for i, k in enumerate(keys)]))
    assert a.drain(30)
    assert a.placement is not None
    a.placement.flush()
    # B's next request for them: one lookup finds all four.
    assert later.get_num_new_matched_tokens(request("b1", tokens), 0) == (16, False)
    assert later.index.holder(keys[3]) == "s3" and later.shared is not None
    assert later.shared.latency_ms()["p50"] < 50
    # A block deleted behind everyone's back: the next engine that misses it removes its entry.
    client = redis.Redis.from_url(index.url)
    s3: Any = a.stack.tiers[1]
    s3._client.delete_object(Bucket=S3_BUCKET, Key=s3.object_name(keys[2]))
    c = worker(cfg)
    assert c.stack.get(keys[2]) is None
    assert c.placement is not None
    c.placement.flush()
    assert client.hget(f"{prefix}:index:s3", keys[2]) is None
    assert client.hget(f"{prefix}:index:s3", keys[1]) is not None
    for side in (a, c):
        side.shutdown()


def test_a_frozen_index_costs_one_bounded_wait_then_lookups_skip_it(index: Any) -> None:
    placement = SharedPlacement(PlacementIndexConfig(url=index.url, key_prefix="frozen", timeout_s=0.05), ["s3"])
    keys = [os.urandom(16) for _ in range(32)]
    placement.publish([("add", k, "s3", 100) for k in keys])
    assert placement.lookup(keys) == {k: "s3" for k in keys}
    index.proc.send_signal(signal.SIGSTOP)
    try:
        start = time.perf_counter()
        assert placement.lookup(keys) == {}
        assert time.perf_counter() - start < 0.5
        start = time.perf_counter()
        for _ in range(100):
            assert placement.lookup(keys) == {}
        assert time.perf_counter() - start < 0.05  # the breaker is open: no more waits
    finally:
        index.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 10
    while placement.lookup(keys) == {} and time.monotonic() < deadline:
        time.sleep(0.2)  # the background probe closes the breaker
    assert placement.lookup(keys) == {k: "s3" for k in keys}


def test_nonsense_in_the_index_is_never_believed(index: Any) -> None:
    placement = SharedPlacement(PlacementIndexConfig(url=index.url, key_prefix="junk"), ["s3"])
    good, bad, neg = os.urandom(16), os.urandom(16), os.urandom(16)
    redis.Redis.from_url(index.url).hset("junk:index:s3", mapping={good: 10, bad: "x", neg: -5})
    assert placement.lookup([good, bad, neg]) == {good: "s3"}


def test_dead_index_at_start_up_is_not_fatal(tmp_path: Path) -> None:
    dead = RedisServer(tmp_path)  # never started: nothing listens
    cfg = KVTierConfig.from_dict({"tiers": [{"kind": "dram", "capacity": "1MiB"}, {
        "kind": "redis", "capacity": 0, "url": "redis://127.0.0.1:1/0"}], "placement_index": {"url": dead.url}},
        env={})
    side = SchedulerSide(cfg, FP, BS)
    start = time.perf_counter()
    assert side.get_num_new_matched_tokens(request("x", list(range(17))), 0) == (0, False)
    assert time.perf_counter() - start < 0.5
