"""What makes a replay of the same requests give the same evictions: the order in which the policy hears of
stores, score updates and reads must not depend on thread timing.

- The step's policy update (attention scores, sinks, prefix links) runs inside the store job right after its
  put, never in a future's done-callback (whose thread and moment vary); a drained save has applied it.
- ``connector.sync_saves``: the step stores and applies before returning, so the placement events are ready
  for that step's output (the scheduler's next lookup sees them).
- A parallel read of several blocks reports the accesses to the policy in key order, not thread order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from kvtier.config import KVTierConfig
from kvtier.connector.metadata import KVTierMetadata, LoadSpec
from kvtier.connector.worker import WorkerSide
from kvtier.keys import BlockKey
from kvtier.policies.lru import LRUPolicy
from kvtier.tiers.stack import TierStack

NUM_BLOCKS, HEADS, BLOCK, HEAD = 16, 2, 16, 8


class RecordingPolicy(LRUPolicy):
    """LRU that writes down what it is told, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, Any]] = []

    def on_insert(self, key: BlockKey, size: int) -> None:
        self.log.append(("insert", key))
        super().on_insert(key, size)

    def on_access(self, key: BlockKey) -> None:
        self.log.append(("access", key))
        super().on_access(key)

    def update_scores(self, scores: Mapping[BlockKey, Any]) -> None:
        self.log.append(("scores", sorted(scores)))


class FakeFeed:
    """Stands in for ScoreFeed: the update it returns reports the step's keys as scores."""

    def __init__(self, stack: TierStack) -> None:
        self.stack = stack

    def on_loads(self, loads: Any) -> None:
        pass

    def on_step_end(self, saves: Iterable[tuple[bytes, int]], sinks: Any, links: Any) -> Callable[[], None]:
        keys = [key for key, _ in saves]
        return lambda: self.stack.update_scores(dict.fromkeys(keys, 1.0))


def worker(tmp_path: Path, sync_saves: bool) -> tuple[WorkerSide, RecordingPolicy]:
    cfg = KVTierConfig.from_dict({"tiers": [{"kind": "dram", "capacity": "1MiB", "page_size": "4KiB",
                                             "pin_memory": "never"}],
                                  "connector": {"sync_saves": sync_saves}}, env={})
    side = WorkerSide(cfg, NUM_BLOCKS)
    gen = torch.Generator().manual_seed(0)
    side.register_kv_caches({f"layer{i}": torch.randn(NUM_BLOCKS, HEADS, BLOCK, 2 * HEAD, generator=gen)
                             .to(torch.bfloat16) for i in range(2)})
    policy = RecordingPolicy()
    side.stack.tiers[0].policy = policy
    side.scores = FakeFeed(side.stack)  # type: ignore[assignment]
    return side, policy


def keys(n: int) -> list[bytes]:
    return [bytes([i + 1]) * 16 for i in range(n)]


def test_sync_saves_store_score_and_report_before_the_step_returns(tmp_path: Path) -> None:
    side, policy = worker(tmp_path, sync_saves=True)
    try:
        ks = keys(3)
        side.wait_for_save(KVTierMetadata(saves=[(k, i + 1) for i, k in enumerate(ks)]))
        # No drain: everything already happened, in order: the puts, then the scores of those blocks.
        assert policy.log == [("insert", k) for k in ks] + [("scores", sorted(ks))]
        meta = side.build_worker_meta()  # what this step's output carries to the scheduler
        assert meta is not None and [key for key, tier in meta.events] == ks
    finally:
        side.shutdown()


def test_async_saves_apply_the_scores_in_the_store_job(tmp_path: Path) -> None:
    side, policy = worker(tmp_path, sync_saves=False)
    put_many = side.stack.put_many

    def slow_put_many(items: Any) -> Any:
        time.sleep(0.05)  # the save is still running when wait_for_save returns
        return put_many(items)

    side.stack.put_many = slow_put_many  # type: ignore[method-assign]
    try:
        ks = keys(2)
        side.wait_for_save(KVTierMetadata(saves=[(k, i + 1) for i, k in enumerate(ks)]))
        assert policy.log == []
        side.drain()  # the store's future is done only once its update has run
        assert policy.log == [("insert", k) for k in ks] + [("scores", sorted(ks))]
    finally:
        side.shutdown()


def test_parallel_reads_touch_the_policy_in_key_order(tmp_path: Path) -> None:
    side, policy = worker(tmp_path, sync_saves=True)
    try:
        ks = keys(6)
        side.wait_for_save(KVTierMetadata(saves=[(k, i + 1) for i, k in enumerate(ks)]))
        policy.log.clear()

        def backwards(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
            """A map whose 'threads' run in reverse order but hand results back in order."""
            items = list(items)
            return list(reversed([fn(x) for x in reversed(items)]))

        found = side.stack.get_many(ks, backwards)
        assert all(f is not None for f in found)
        assert policy.log == [("access", k) for k in ks]
        policy.log.clear()
        side.start_load_kv(KVTierMetadata(loads=[LoadSpec("r1", ks, list(range(8, 14)))]))  # the load pool
        assert policy.log == [("access", k) for k in ks]
    finally:
        side.shutdown()
