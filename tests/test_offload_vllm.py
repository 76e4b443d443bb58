"""The kvtier secondary tier under vLLM's own TieringOffloadingManager (the scheduler side of
OffloadingConnector with ``spec_name: TieringOffloadingSpec``), with its real CPU primary tier.

The primary tier's worker side (GPU <-> host copies) refuses the CPU build, but its scheduler side runs here:
a shared-memory region of chunk rows, vLLM's LRU over them, and the cascade/promotion logic that calls the
secondary tier. The test plays the GPU worker's part by writing chunk bytes into the rows vLLM hands out.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from offload_helpers import CHUNK, TIER_TYPE, corrupt_record, fill_rows, make_spec, okey

pytest.importorskip("vllm.v1.kv_offload.tiering.manager")
from vllm.config import KVTransferConfig  # noqa: E402
from vllm.v1.kv_offload.base import LookupResult, ReqContext, ScheduleEndContext  # noqa: E402
from vllm.v1.kv_offload.factory import OffloadingSpecFactory  # noqa: E402
from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory  # noqa: E402
from vllm.v1.kv_offload.tiering.manager import TieringOffloadingManager  # noqa: E402
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec  # noqa: E402
from vllm.v1.metrics.cache_hit_source import CacheHitSource  # noqa: E402

from kvtier.config import KVTierConfig  # noqa: E402
from kvtier.offload.secondary import KVTierSecondaryTier  # noqa: E402

ROWS = 4
STEP = ScheduleEndContext(new_req_ids=(), preempted_req_ids=())


def run_steps_until_idle(manager: TieringOffloadingManager, timeout_s: float = 10.0) -> None:
    """End scheduler steps until no transfer is in flight (as the engine keeps stepping while it has work)."""
    deadline = time.monotonic() + timeout_s
    while True:
        manager.on_schedule_end(STEP)
        if not manager.has_pending_work():
            return
        assert time.monotonic() < deadline, "secondary-tier jobs did not finish"
        time.sleep(0.002)


def offload(manager: TieringOffloadingManager, rows: np.ndarray, req: ReqContext, keys: list[bytes]) -> dict:
    """GPU -> primary store of ``keys`` (the test writes the bytes), then the cascade to the secondary tier."""
    out = manager.prepare_store(keys, req)
    assert out is not None and out.keys_to_store == keys
    chunk_rows = [int(c) for c in out.store_spec.chunk_ids]  # type: ignore[attr-defined]
    written = fill_rows(rows, chunk_rows)
    manager.complete_store(keys, req)  # cascades to every secondary tier
    run_steps_until_idle(manager)
    return {key: written[row] for key, row in zip(keys, chunk_rows)}


def test_cascade_evict_and_promote_through_vllm_manager(tmp_path: Path) -> None:
    entry = {"type": TIER_TYPE, "module_path": "kvtier.offload.secondary",
             "tiers": [{"kind": "disk", "capacity": "16MiB", "path": str(tmp_path / "disk"), "codec": "lz4"}]}
    manager = make_spec(ROWS, [entry]).get_manager()
    assert isinstance(manager, TieringOffloadingManager)
    tier = manager.secondary_tiers[0]
    assert isinstance(tier, KVTierSecondaryTier)
    rows = np.asarray(manager.primary_tier.get_kv_memoryview())
    assert rows.shape == (ROWS, CHUNK)
    try:
        # 1. Request a offloads four chunks: they fill the primary tier and cascade into kvtier's disk tier.
        req_a = ReqContext(req_id="a")
        manager.on_new_request(req_a)
        first = offload(manager, rows, req_a, [okey(i) for i in range(4)])
        assert all(tier.lookup(k, req_a) is LookupResult.HIT for k in first)
        manager.on_request_finished(req_a)
        # 2. Request b offloads four other chunks: vLLM's LRU evicts a's chunks from host memory.
        req_b = ReqContext(req_id="b")
        manager.on_new_request(req_b)
        offload(manager, rows, req_b, [okey(i) for i in range(10, 14)])
        manager.on_request_finished(req_b)
        assert manager.primary_tier.lookup(okey(0), req_b) is LookupResult.MISS
        # 3. One of a's records goes bad on disk.
        bad = okey(2)
        corrupt_record("disk", tier, bad)
        # 4. Request c asks for a's chunks: each is a secondary hit, so vLLM reserves a row and promotes it.
        req_c = ReqContext(req_id="c")
        manager.on_new_request(req_c)
        assert [manager.lookup(k, req_c) for k in first] == [LookupResult.HIT_PENDING] * 4
        run_steps_until_idle(manager)  # submit_load, then the finished job is reported
        # 5. The good chunks are host hits now, byte-exact; the bad one is a miss (recomputed), not a loop.
        results = {k: manager.lookup(k, req_c) for k in first}
        assert results == {k: LookupResult.MISS if k == bad else LookupResult.HIT for k in first}
        good = [k for k in first if k != bad]
        spec = manager.prepare_load(good, req_c)
        for key, chunk in zip(good, spec.chunk_ids):  # type: ignore[attr-defined]
            assert rows[int(chunk)].tobytes() == first[key]
        assert manager.get_load_source(good[0], req_c) is CacheHitSource.DISK
        manager.complete_load(good, req_c)
        manager.on_request_finished(req_c)
        assert not manager.has_pending_work()
    finally:
        manager.shutdown()


def doc_blocks(language: str) -> list[str]:
    text = (Path(__file__).parent.parent / "docs" / "offload-secondary-tier.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_documented_configs_are_what_vllm_accepts(tmp_path: Path) -> None:
    """The README's two --kv-transfer-config examples, parsed by vLLM's own config and factories."""
    (serve,) = doc_blocks("bash")
    (inline,) = doc_blocks("json")
    documented = [json.loads(serve.split("'")[1]), json.loads(inline)]
    for doc in documented:
        transfer = KVTransferConfig(**doc)
        assert transfer.kv_connector == "OffloadingConnector" and transfer.is_kv_transfer_instance
        extra = transfer.kv_connector_extra_config
        assert OffloadingSpecFactory.get_spec_cls(extra) is TieringOffloadingSpec
        (entry,) = extra["secondary_tiers"]
        assert SecondaryTierFactory.get_tier_class(entry) is KVTierSecondaryTier
    # The inline one starts, with its disk path moved into tmp_path (and a small CPU tier).
    extra = json.loads(inline.replace("/mnt/nvme/kvtier", str(tmp_path / "nvme")))["kv_connector_extra_config"]
    manager = make_spec(ROWS, extra_config=extra).get_manager()
    try:
        (tier,) = manager.secondary_tiers  # type: ignore[attr-defined]
        assert isinstance(tier, KVTierSecondaryTier) and [t.kind for t in tier.stack.tiers] == ["disk"]
    finally:
        manager.shutdown()
    # The YAML file the serve example names is a valid kvtier config.
    (yaml_text,) = doc_blocks("yaml")
    cfg = KVTierConfig.from_dict(yaml.safe_load(yaml_text), env={})
    assert [t.kind for t in cfg.tiers] == ["disk", "s3"]
