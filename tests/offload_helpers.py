"""Helpers for the offload secondary-tier tests: a vLLM offloading spec, jobs, rows of host memory, damage."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from vllm.v1.kv_offload.base import OffloadKey, ReqContext, make_offload_key
from vllm.v1.kv_offload.config import (
    OffloadingCacheConfig,
    OffloadingConfig,
    OffloadingGroupConfig,
    OffloadingModelConfig,
    OffloadingParallelConfig,
)
from vllm.v1.kv_offload.tiering.base import JobResult, TransferJob
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec

from kvtier.offload.secondary import KVTierSecondaryTier

CHUNK = 16 * 1024  # bytes per primary-tier row (page aligned, as vLLM allocates it)
TIER_TYPE = "KVTierSecondaryTier"


def make_spec(rows: int, secondary_tiers: Sequence[dict[str, Any]] = (),
              extra_config: Mapping[str, Any] | None = None) -> TieringOffloadingSpec:
    """vLLM's tiering spec for a one-group, one-worker model whose chunk is CHUNK bytes; ``rows`` CPU chunks.
    ``extra_config`` replaces the connector's extra config (its ``cpu_bytes_to_use`` is set to ``rows`` chunks)."""
    extra = dict(extra_config) if extra_config is not None else {
        "spec_name": "TieringOffloadingSpec", "secondary_tiers": [dict(t) for t in secondary_tiers]}
    extra["cpu_bytes_to_use"] = rows * CHUNK
    config = OffloadingConfig(
        groups=(OffloadingGroupConfig(tokens_per_block=16, layer_names=("layers.0.attn", "layers.1.attn"),
                                      group_id=0),),
        worker_kv_bytes_per_block=CHUNK,
        enable_kv_cache_events=False,
        extra_config=extra,
        engine_id=f"kvtier-test-{uuid.uuid4().hex[:12]}",
        model=OffloadingModelConfig(name="local/tiny-llama", dtype="bfloat16"),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=1),
        parallel=OffloadingParallelConfig(rank=0, world_size=1, tp_size=1, pp_size=1, pcp_size=1, dcp_size=1,
                                          data_parallel_index=0, data_parallel_size=1,
                                          data_parallel_rank_local=None, is_parallelism_agnostic=True),
    )
    return TieringOffloadingSpec(config)


def okey(i: int, group: int = 0) -> OffloadKey:
    """An offload key as vLLM builds it: a 32-byte block hash and the group index."""
    return make_offload_key(i.to_bytes(4, "little") * 8, group)


def fill_rows(rows: np.ndarray, indices: Sequence[int]) -> dict[int, bytes]:
    """Fill the given rows with half-compressible bytes; returns row -> bytes written."""
    written = {}
    for row in indices:
        data = (row.to_bytes(2, "little") * (rows.shape[1] // 4)) + os.urandom(rows.shape[1] // 2)
        rows[row] = np.frombuffer(data, dtype=np.int8)
        written[row] = data
    return written


def transfer_job(job_id: int, keys: Sequence[OffloadKey], chunks: Sequence[int], is_promotion: bool,
                 req: ReqContext) -> TransferJob:
    return TransferJob(job_id=job_id, keys=list(keys), chunk_ids=np.array(chunks, dtype=np.int32),
                       is_promotion=is_promotion, req_context=req)


def wait_results(tier: KVTierSecondaryTier, count: int, timeout_s: float = 10.0) -> list[JobResult]:
    """Poll get_finished_jobs (as the scheduler does each step) until ``count`` jobs were reported."""
    results: list[JobResult] = []
    deadline = time.monotonic() + timeout_s
    while len(results) < count:
        assert time.monotonic() < deadline, f"only {len(results)} of {count} jobs finished in {timeout_s} s"
        results.extend(tier.get_finished_jobs())
        time.sleep(0.002)
    return results


def corrupt_record(kind: str, tier: KVTierSecondaryTier, key: OffloadKey) -> None:
    """Overwrite the stored record of ``key`` with same-sized garbage, with the backend's own client."""
    backend: Any = tier.stack.tiers[0]
    block_key = tier.block_key(key)
    if kind == "disk":
        path = backend.path_of(block_key)
        path.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()))
    elif kind == "s3":
        name = backend.object_name(block_key)
        body = backend._client.get_object(Bucket=backend.bucket, Key=name)["Body"].read()
        backend._client.put_object(Bucket=backend.bucket, Key=name, Body=body[:-7] + b"garbage")
    else:
        name = backend.redis_key(block_key)
        body = backend._client.get(name)
        backend._client.set(name, body[:100] + bytes(b ^ 0x01 for b in body[100:]))
