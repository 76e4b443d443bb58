"""KVTierSecondaryTier driven through vLLM's own secondary-tier interface, over real tiers.

vLLM's factory builds the tier from a ``secondary_tiers`` entry (``module_path``, as a deployment would) over a
host buffer laid out like the CPU primary tier (one int8 row per chunk, as ``create_kv_memoryview`` makes it);
jobs are vLLM ``TransferJob``s and results vLLM ``JobResult``s. Backends: a disk tier in tmp_path, SeaweedFS S3
and redis-server (session fixtures from tests/servers.py). The whole CPU-primary path, through vLLM's
TieringOffloadingManager, is in tests/test_offload_vllm.py.
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from offload_helpers import (
    CHUNK,
    TIER_TYPE,
    corrupt_record,
    fill_rows,
    make_spec,
    okey,
    transfer_job,
    wait_results,
)
from servers import S3_BUCKET

from kvtier.errors import ConfigError
from kvtier.offload.jobs import Job, JobRunner
from kvtier.offload.keys import namespace_digest, offload_block_key
from kvtier.offload.secondary import KVTierSecondaryTier

pytest.importorskip("vllm.v1.kv_offload.tiering.factory")
from vllm.v1.kv_offload.base import LookupResult, ReqContext  # noqa: E402
from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory  # noqa: E402

ROWS = 8
SENTINEL = 0x5A


def host_view(rows: int = ROWS) -> tuple[np.ndarray, memoryview]:
    array = np.zeros((rows, CHUNK), dtype=np.int8)
    return array, memoryview(array)


def disk_tiers(tmp_path: Path) -> list[dict[str, Any]]:
    return [{"kind": "disk", "capacity": "64MiB", "path": str(tmp_path / "disk"),
             "codec": {"name": "lz4", "shuffle": True}}]


def s3_tiers(server: Any) -> list[dict[str, Any]]:
    return [{"kind": "s3", "capacity": "64MiB", "bucket": S3_BUCKET, "prefix": f"off-{uuid.uuid4().hex[:8]}",
             "endpoint_url": server.endpoint_url, "region": "us-east-1", "addressing_style": "path",
             "access_key_id": server.access_key, "secret_access_key": server.secret_key,
             "connect_timeout_s": 1.0, "save_timeout_s": 3.0, "retries": 1, "codec": "zstd"}]


def redis_tiers(server: Any) -> list[dict[str, Any]]:
    return [{"kind": "redis", "capacity": "64MiB", "url": server.url, "key_prefix": f"off-{uuid.uuid4().hex[:8]}",
             "load_timeout_s": 1.0, "codec": "lz4"}]


def open_tier(view: memoryview, tiers: list[dict[str, Any]], **entry: Any) -> KVTierSecondaryTier:
    """Build the tier the way vLLM does: SecondaryTierFactory with the entry of ``secondary_tiers``."""
    config = {"type": TIER_TYPE, "module_path": "kvtier.offload.secondary", "tiers": tiers, **entry}
    tier = SecondaryTierFactory.create_secondary_tier(config, view, make_spec(ROWS))
    assert isinstance(tier, KVTierSecondaryTier)
    return tier


@pytest.fixture(params=["disk", "s3", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Any, list[dict[str, Any]]]:
    if request.param == "disk":
        return "disk", None, disk_tiers(tmp_path)
    if request.param == "s3":
        server = request.getfixturevalue("seaweed_server")
        return "s3", server, s3_tiers(server)
    server = request.getfixturevalue("redis_server")
    return "redis", server, redis_tiers(server)


def store(tier: KVTierSecondaryTier, job_id: int, keys: list[bytes], chunks: list[int], req: ReqContext) -> None:
    tier.submit_store(transfer_job(job_id, keys, chunks, False, req))
    (result,) = wait_results(tier, 1)
    assert result.job_id == job_id and result.success and result.transfer_bytes == len(keys) * CHUNK


# ---- keys --------------------------------------------------------------------------------------------------
def test_keys_are_deterministic_16_bytes_and_namespaced() -> None:
    ns = namespace_digest({"model_name": "m", "dtype": "bfloat16"}, CHUNK)
    key = okey(1)
    assert offload_block_key(ns, key) == offload_block_key(ns, bytes(key)) and len(offload_block_key(ns, key)) == 16
    others = [namespace_digest({"model_name": "m2", "dtype": "bfloat16"}, CHUNK),
              namespace_digest({"model_name": "m", "dtype": "bfloat16"}, 2 * CHUNK),
              namespace_digest({"model_name": "m", "dtype": "bfloat16"}, CHUNK, "tenant-b")]
    assert len({offload_block_key(n, key) for n in [ns, *others]}) == 4
    assert offload_block_key(ns, okey(1, group=1)) != offload_block_key(ns, key)


# ---- store, look up, load ----------------------------------------------------------------------------------
def test_store_then_load_back_byte_exact(backend: tuple[str, Any, list[dict[str, Any]]]) -> None:
    rows, view = host_view()
    tier = open_tier(view, backend[2])
    req = ReqContext(req_id="r1")
    tier.on_new_request(req)
    keys = [okey(i) for i in range(4)]
    data = fill_rows(rows, [0, 1, 2, 3])
    # 1. Cascade rows 0..3 into the tier; before the job is reported the keys may still be missing.
    store(tier, 1, keys, [0, 1, 2, 3], req)
    # 2. Every stored key is a hit, an unknown one a miss.
    assert [tier.lookup(k, req) for k in keys] == [LookupResult.HIT] * 4
    assert tier.lookup(okey(99), req) is LookupResult.MISS
    # 3. Promote them into other rows (in another order): the rows hold exactly the stored bytes.
    rows[4:8] = SENTINEL
    tier.submit_load(transfer_job(2, keys, [7, 6, 5, 4], True, req))
    (result,) = wait_results(tier, 1)
    assert result.success and result.successful_keys is None and result.transfer_bytes == 4 * CHUNK
    for i, row in zip(range(4), [7, 6, 5, 4]):
        assert rows[row].tobytes() == data[i]
    # 4. Storing a key that is already held moves nothing twice and still succeeds.
    store(tier, 3, keys[:2], [7, 6], req)
    assert not tier.has_pending_work()
    tier.on_request_finished(req)
    tier.shutdown()


def test_a_restarted_tier_finds_its_blocks_and_namespaces_stay_apart(tmp_path: Path) -> None:
    rows, view = host_view()
    data = fill_rows(rows, [0, 1])
    req = ReqContext(req_id="r")
    first = open_tier(view, disk_tiers(tmp_path))
    first.on_new_request(req)
    store(first, 1, [okey(0), okey(1)], [0, 1], req)
    first.shutdown()
    # Same config and layout: the keys map the same way, and the disk tier adopts its files at start-up.
    second = open_tier(view, disk_tiers(tmp_path))
    second.on_new_request(req)
    assert second.lookup(okey(1), req) is LookupResult.HIT
    second.submit_load(transfer_job(2, [okey(1)], [5], True, req))
    assert wait_results(second, 1)[0].success and rows[5].tobytes() == data[1]
    second.shutdown()
    # Another namespace (e.g. another tenant or model build) never sees them.
    third = open_tier(view, disk_tiers(tmp_path), namespace="other")
    third.on_new_request(req)
    assert third.lookup(okey(1), req) is LookupResult.MISS
    third.shutdown()


# ---- damage and faults -------------------------------------------------------------------------------------
def test_corrupt_record_is_a_failed_chunk_and_its_row_is_untouched(
        backend: tuple[str, Any, list[dict[str, Any]]]) -> None:
    kind, _, tiers = backend
    rows, view = host_view()
    tier = open_tier(view, tiers)
    req = ReqContext(req_id="r1")
    tier.on_new_request(req)
    keys = [okey(10), okey(11), okey(12)]
    data = fill_rows(rows, [0, 1, 2])
    store(tier, 1, keys, [0, 1, 2], req)
    # 1. Flip the stored record of the middle chunk behind the tier's back.
    corrupt_record(kind, tier, keys[1])
    rows[4:7] = SENTINEL
    tier.submit_load(transfer_job(2, keys, [4, 5, 6], True, req))
    (result,) = wait_results(tier, 1)
    # 2. The job failed, naming the chunks that did land; the bad chunk's row keeps what it held.
    assert not result.success and set(result.successful_keys or ()) == {keys[0], keys[2]}
    assert rows[4].tobytes() == data[0] and rows[6].tobytes() == data[2]
    assert rows[5].tobytes() == bytes([SENTINEL]) * CHUNK
    # 3. The bad chunk is a miss from now on (the stack dropped the record), for any request.
    assert tier.lookup(keys[1], req) is LookupResult.MISS
    assert tier.lookup(keys[1], ReqContext(req_id="r2")) is LookupResult.MISS
    assert tier.stack.metrics.snapshot()[tiers[0]["kind"]]["checksum_failures"] == 1
    tier.shutdown()


def test_a_key_that_failed_to_load_is_a_miss_for_that_request(tmp_path: Path) -> None:
    rows, view = host_view()
    tier = open_tier(view, disk_tiers(tmp_path))
    req, other = ReqContext(req_id="r1"), ReqContext(req_id="r2")
    tier.on_new_request(req)
    tier.on_new_request(other)
    fill_rows(rows, [0])
    store(tier, 1, [okey(0)], [0], req)
    # A chunk id outside the primary tier fails that chunk (nothing is written anywhere) ...
    tier.submit_load(transfer_job(2, [okey(0)], [ROWS + 3], True, req))
    (result,) = wait_results(tier, 1)
    assert not result.success and result.successful_keys is None and result.transfer_bytes == 0
    # ... and the request that saw it fail is not offered the key again (no promote-fail loop); others are.
    assert tier.lookup(okey(0), req) is LookupResult.MISS
    assert tier.lookup(okey(0), other) is LookupResult.HIT
    tier.on_request_finished(req)
    tier.shutdown()


@pytest.mark.parametrize("kind", ["s3", "redis"])
def test_stopped_server_fails_jobs_fast_without_raising(kind: str, request: pytest.FixtureRequest) -> None:
    server = request.getfixturevalue("seaweed_server" if kind == "s3" else "redis_server")
    rows, view = host_view()
    tier = open_tier(view, s3_tiers(server) if kind == "s3" else redis_tiers(server))
    req = ReqContext(req_id="r1")
    tier.on_new_request(req)
    fill_rows(rows, [0, 1])
    store(tier, 1, [okey(0)], [0], req)
    rows[4] = SENTINEL
    server.stop()  # SIGKILL, like a crash
    try:
        # 1. Submitting returns at once; both jobs end as failures within the tier timeouts.
        start = time.monotonic()
        tier.submit_load(transfer_job(2, [okey(0)], [4], True, req))
        tier.submit_store(transfer_job(3, [okey(1)], [1], False, req))
        assert time.monotonic() - start < 0.05
        results = {r.job_id: r for r in wait_results(tier, 2, timeout_s=8.0)}
        assert time.monotonic() - start < 8.0
        assert not results[2].success and not results[3].success
        assert rows[4].tobytes() == bytes([SENTINEL]) * CHUNK
        # 2. While the breaker says the server is down, its keys are misses: no doomed promotions.
        assert tier.lookup(okey(0), ReqContext(req_id="r2")) is LookupResult.MISS
    finally:
        server.start()
        if kind == "s3":
            server.ensure_bucket(S3_BUCKET)
        tier.shutdown()


def test_calls_return_at_once_while_io_is_pending(redis_server: Any) -> None:
    rows, view = host_view()
    tier = open_tier(view, redis_tiers(redis_server))
    req = ReqContext(req_id="r1")
    tier.on_new_request(req)
    data = fill_rows(rows, [0, 1, 2, 3])
    store(tier, 1, [okey(0)], [0], req)
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)  # the server hangs (below the client's 1 s socket timeout)
    try:
        start = time.monotonic()
        tier.submit_store(transfer_job(2, [okey(1), okey(2), okey(3)], [1, 2, 3], False, req))
        tier.submit_load(transfer_job(3, [okey(0)], [6], True, req))
        lookups = [tier.lookup(okey(i), req) for i in range(4)]
        assert time.monotonic() - start < 0.05, "submit/lookup waited for I/O"
        assert lookups[0] is LookupResult.HIT
        time.sleep(0.3)
        start = time.monotonic()
        assert list(tier.get_finished_jobs()) == [] and tier.has_pending_work()
        assert time.monotonic() - start < 0.05
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    # drain_jobs waits for the I/O to end; the results then come back with the next poll.
    tier.drain_jobs()
    results = {r.job_id: r for r in tier.get_finished_jobs()}
    assert results.keys() == {2, 3} and all(r.success for r in results.values())
    assert rows[6].tobytes() == data[0] and not tier.has_pending_work()
    tier.shutdown()


def test_job_runner_turns_a_raising_task_into_a_failed_block() -> None:
    runner = JobRunner(load_threads=2, store_threads=1)

    def boom() -> bool:
        raise RuntimeError("client bug")

    # A job's blocks run on the pool; one raising marks only its own block failed, and nothing escapes.
    runner.submit(Job(1, True, "r", [b"a", b"b", b"c"]), [lambda: True, boom, lambda: True])
    runner.submit(Job(2, False, "r", []), [])  # an empty job finishes at once
    assert runner.drain(timeout_s=5.0)
    finished = {job.job_id: job.done for job in runner.take_finished()}
    assert finished == {1: [True, False, True], 2: []} and runner.in_flight == 0
    with pytest.raises(ValueError, match="2 tasks for 1 keys"):
        runner.submit(Job(3, True, "r", [b"a"]), [lambda: True, lambda: True])
    runner.shutdown()


# ---- configuration -----------------------------------------------------------------------------------------
def test_config_errors_name_the_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVTIER_CONFIG", raising=False)
    _, view = host_view()
    spec = make_spec(ROWS)
    entry = {"type": TIER_TYPE, "module_path": "kvtier.offload.secondary"}
    with pytest.raises(ConfigError, match="set 'config'.*or 'tiers'"):
        SecondaryTierFactory.create_secondary_tier(entry, view, spec)
    with pytest.raises(ConfigError, match="do not also give"):
        SecondaryTierFactory.create_secondary_tier({**entry, "config": "x.yaml", "tiers": []}, view, spec)
    with pytest.raises(ConfigError, match=r"tiers\[0\].capcity: unknown key"):
        SecondaryTierFactory.create_secondary_tier(
            {**entry, "tiers": [{"kind": "disk", "capacity": "1MiB", "capcity": 1}]}, view, spec)
    # A YAML file named by 'config' works like the connector's.
    path = tmp_path / "kvtier.yaml"
    path.write_text(f"tiers:\n  - {{kind: disk, capacity: 8MiB, path: {tmp_path / 'd'}}}\n")
    tier = SecondaryTierFactory.create_secondary_tier({**entry, "config": str(path)}, view, spec)
    assert [t.kind for t in tier.stack.tiers] == ["disk"]  # type: ignore[attr-defined]
    tier.shutdown()

