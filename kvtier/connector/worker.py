"""Worker-side connector: loads into the blocks vLLM allocated, saves computed blocks, reports back.

Saves: the blocks named in the step's metadata are gathered into host memory at the end of the step
(``wait_for_save``), so vLLM may reuse them right away; encoding and storing run on the save queue, which
holds at most ``connector.max_pending_save_bytes`` of host copies (beyond it a save is dropped and counted).
Loads: blocks are fetched from the tiers in parallel, verified (checksum, key, size) and copied into vLLM's
blocks. A block that is missing, corrupt or of the wrong size fails its request's load from that block on,
and anything that goes wrong in a load fails all of its blocks: the failed block ids always reach
``get_block_ids_with_load_errors`` (sync and async loads alike), so vLLM recomputes them and never runs on
whatever its blocks held before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvtier.config import KVTierConfig
from kvtier.connector.counters import Counters
from kvtier.connector.metadata import KVTierMetadata, KVTierWorkerMeta, LoadSpec
from kvtier.connector.placement import StartupPlacement
from kvtier.connector.savequeue import SaveQueue
from kvtier.keys import rank_key
from kvtier.sharing import SharedPlacement
from kvtier.tiers.stack import TierStack
from kvtier.transfer import KVLayout

if TYPE_CHECKING:
    from kvtier.attention.feed import ScoreFeed

log = logging.getLogger("kvtier.worker")


class WorkerSide:
    def __init__(self, cfg: KVTierConfig, num_blocks: int | None = None, rank: int = 0, world: int = 1) -> None:
        self.cfg = cfg
        self.num_blocks = num_blocks
        self.rank, self.world = rank, world  # this worker stores its shard of each block under rank_key(key)
        self._events: list[tuple[bytes, str | None]] = []
        self._events_lock = threading.Lock()
        threads = cfg.connector.transfer_threads
        self.saves = SaveQueue(threads, cfg.connector.max_pending_save_bytes)
        # Promotions after a lower-tier hit run with the saves, never on the request's path.
        self.stack = TierStack.from_config(cfg, on_change=self._on_change, background=self._background)
        self.layout: KVLayout | None = None
        self.scores: ScoreFeed | None = None  # attention-score feed, set by attach_attention
        # Separate pools: a load (on the request's critical path) never queues behind background saves.
        self.load_pool = ThreadPoolExecutor(threads, thread_name_prefix="kvtier-load")
        self._async_loads: dict[str, Future[set[int]]] = {}
        self._storing: dict[bytes, Future[Any]] = {}  # keys whose save is queued or running
        self._storing_lock = threading.Lock()
        self._load_errors: set[int] = set()
        self.placement = self._publish_placement(cfg)
        self.counters = Counters(self._tier_stats, cfg.metrics.log_interval_s)
        self.exporter = None
        if cfg.metrics.prometheus_port is not None:  # standalone /metrics on 127.0.0.1 (kvtier/prom.py)
            from kvtier.prom import start_exporter

            self.exporter = start_exporter(cfg.metrics.prometheus_port, self.stack, self.counters.values)

    def _publish_placement(self, cfg: KVTierConfig) -> SharedPlacement | None:
        """With a placement index, every shared tier tells it what it gains and loses (kvtier/sharing.py)."""
        shared = [t for t in self.stack.tiers if t.shared]
        if not cfg.placement_index.url or not shared:
            return None
        placement = SharedPlacement(cfg.placement_index, [t.name for t in shared])
        for tier in shared:
            tier.listener = (lambda change, key, size, name=tier.name:  # type: ignore[attr-defined]
                             placement.note(change, key, name, size))
        return placement

    def _tier_stats(self) -> dict[str, Any]:
        extra = self.scores.counters() if self.scores is not None else {}
        if self.placement is not None:
            extra = {**extra, **{f"placement_index.{k}": v for k, v in self.placement.counters.items()}}
        return {"counters": extra, "tiers": self.stack.metrics.snapshot(), "usage": self.stack.usage()}

    def _background(self, job: Callable[[], None]) -> None:
        if self.saves.submit(job) is None:
            self.counters.add(promotions_dropped=1)

    def startup_placement(self) -> StartupPlacement:
        """What the persistent tiers held at start-up (restored by the stack), fastest tier first."""
        return StartupPlacement.pack((t.name, t.keys()) for t in self.stack.tiers if t.persistent)

    def _on_change(self, key: bytes, tier: str | None) -> None:
        with self._events_lock:
            self._events.append((key, tier))

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.layout = KVLayout(kv_caches, self.num_blocks)
        self.stack.raw_size = self.layout.block_bytes  # a record of any other raw size is corrupt
        log.info("kvtier: registered KV caches: %s", self.layout.describe())

    def attach_attention(self, layers: dict[str, Any] | None, block_size: int) -> None:
        """Start attention-score capture (kvtier.attention) on the model's attention layers, if configured."""
        try:
            from kvtier.attention.feed import ScoreFeed

            self.scores = ScoreFeed.create(self.cfg.attention, self.stack, block_size, self.num_blocks)
            if self.scores is not None and self.layout is not None:
                self.scores.install(layers, [layer.name for layer in self.layout.layers])
        except Exception:  # never fail engine start-up over scoring
            log.exception("kvtier: attention capture could not start; policies rank by hit counts only")
            self.scores = None

    def local(self, meta: KVTierMetadata) -> KVTierMetadata:
        """The step's plan in this rank's shard keys (the scheduler plans whole blocks)."""
        if self.world == 1:
            return meta

        def shard(key: bytes) -> bytes:
            return rank_key(key, self.rank, self.world)

        return KVTierMetadata(
            loads=[LoadSpec(s.req_id, [shard(k) for k in s.keys], s.block_ids, s.is_async) for s in meta.loads],
            saves=[(shard(k), b) for k, b in meta.saves], clear_store=meta.clear_store,
            sinks=[shard(k) for k in meta.sinks], links=[(shard(c), shard(p)) for c, p in meta.links])

    # ---- loads -------------------------------------------------------------------------------------
    def start_load_kv(self, meta: KVTierMetadata) -> None:
        meta = self.local(meta)
        if meta.clear_store:
            self.stack.clear()  # forgets at once; local storage is freed in the background
        if self.scores is not None:
            self.scores.on_loads([list(zip(spec.keys, spec.block_ids, strict=False)) for spec in meta.loads])
        for spec in meta.loads:
            if spec.is_async:
                self._async_loads[spec.req_id] = self.load_pool.submit(self._load, spec)
            else:
                self._load_errors |= self._load(spec, parallel=True)

    def _load(self, spec: LoadSpec, parallel: bool = False) -> set[int]:
        """Load one request's blocks; returns the block ids that failed (from the first failure on, or all of
        them when anything went wrong). Never raises."""
        start = time.perf_counter()
        try:
            good, sources = self._copy_in(spec, parallel)
        except Exception as exc:  # whatever failed, vLLM recomputes every block of this load
            log.warning("kvtier: load of request %s failed (%s: %s); vLLM recomputes its %d blocks", spec.req_id,
                        type(exc).__name__, exc, len(spec.block_ids))
            good, sources = 0, []
        for tier in sources:
            self.counters.add(**{f"loaded_blocks.{tier}": 1})
        block_bytes = self.layout.block_bytes if self.layout is not None else 0
        self.counters.add(loaded_blocks=good, load_failed_blocks=len(spec.keys) - good,
                          loaded_bytes=good * block_bytes, load_time_s=time.perf_counter() - start)
        if good < len(spec.keys):
            log.info("kvtier: request %s: %d of %d blocks failed to load; vLLM recomputes them",
                     spec.req_id, len(spec.keys) - good, len(spec.keys))
        return set(spec.block_ids[good:])

    def _copy_in(self, spec: LoadSpec, parallel: bool) -> tuple[int, list[str]]:
        """Fetch, verify and scatter the longest loadable prefix; (blocks loaded, the tier of each)."""
        if self.layout is None:
            raise RuntimeError("register_kv_caches was not called")
        if len(spec.keys) != len(spec.block_ids):
            raise ValueError(f"{len(spec.keys)} keys for {len(spec.block_ids)} blocks")
        self._await_saves(spec.keys)
        fetched = self.stack.get_many(spec.keys, self.load_pool.map if parallel else map)
        good = 0
        while good < len(fetched) and fetched[good] is not None and len(fetched[good][0]) == self.layout.block_bytes:
            good += 1
        if good:
            host = self.layout.host_buffer(good)
            arr = host.numpy()
            for i in range(good):
                arr[i] = np.frombuffer(fetched[i][0], dtype=np.uint8)  # type: ignore[index]
            self.layout.scatter(spec.block_ids[:good], host)
        return good, [found[1] for found in fetched[:good] if found is not None]

    def _await_saves(self, keys: list[bytes], timeout_s: float = 2.0) -> None:
        """A load may be planned for blocks whose save has not landed yet (the scheduler counts them as held
        until told otherwise): wait for those saves, a bounded while (a block still missing then is a miss)."""
        with self._storing_lock:
            futures = {self._storing[k] for k in keys if k in self._storing}
        deadline = time.monotonic() + timeout_s
        for future in futures:
            try:
                future.exception(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # timed out or cancelled: the fetch decides
                pass

    def _track(self, keys: list[bytes], future: Future[Any]) -> None:
        with self._storing_lock:
            for key in keys:
                self._storing[key] = future

        def untrack(done: Future[Any]) -> None:
            with self._storing_lock:
                for key in keys:
                    if self._storing.get(key) is done:
                        del self._storing[key]

        future.add_done_callback(untrack)

    # ---- saves -------------------------------------------------------------------------------------
    def wait_for_save(self, meta: KVTierMetadata) -> None:
        meta = self.local(meta)
        if not meta.saves or self.layout is None:
            if self.scores is not None:
                self.scores.on_step_end(meta.saves, meta.sinks, meta.links, None)
            return
        start = time.perf_counter()
        keys = [key for key, _ in meta.saves]
        nbytes = len(keys) * self.layout.block_bytes
        if self.saves.held_bytes + nbytes > self.saves.max_bytes:
            self._drop_saves(keys)  # the store is behind: no host copy either
            future = None
        else:
            host = self.layout.gather([block_id for _, block_id in meta.saves])
            self.counters.add(gather_time_s=time.perf_counter() - start)
            future = self.saves.submit(lambda: self._store(keys, host), nbytes)
            if future is None:
                self._drop_saves(keys)
            else:
                self._track(keys, future)
        if self.scores is not None:  # attention scores, sinks, links: applied once this store has landed
            self.scores.on_step_end(meta.saves, meta.sinks, meta.links, future)

    def _drop_saves(self, keys: list[bytes]) -> None:
        self.counters.add(save_dropped_blocks=len(keys))
        for key in keys:
            self._on_change(key, None)  # the scheduler stops waiting for them

    def _store(self, keys: list[bytes], host: torch.Tensor) -> None:
        start = time.perf_counter()
        arr = host.numpy()
        try:
            results = self.stack.put_many([(key, memoryview(arr[i])) for i, key in enumerate(keys)])
        except Exception as exc:  # a save must never take the engine down
            log.warning("kvtier: save failed: %s", exc)
            results = [False] * len(keys)
        for key, ok in zip(keys, results):
            if not ok:
                self._on_change(key, None)
        stored = sum(results)
        self.counters.add(saved_blocks=stored, save_failed_blocks=len(keys) - stored,
                          saved_bytes=stored * host.shape[1], save_time_s=time.perf_counter() - start)

    # ---- completion and reporting ------------------------------------------------------------------
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done = {rid for rid, fut in self._async_loads.items() if fut.done()}
        for rid in done:
            self._load_errors |= self._async_loads.pop(rid).result()  # _load never raises
        return None, (done or None)

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def build_worker_meta(self) -> KVTierWorkerMeta | None:
        with self._events_lock:
            if not self._events:
                return None
            events, self._events = self._events, []
        return KVTierWorkerMeta(events)

    def snapshot(self) -> dict[str, Any]:
        return self.counters.snapshot()

    def stats_data(self) -> dict[str, Any] | None:
        return self.counters.delta()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for queued saves and promotions; False when ``timeout`` ran out first."""
        return self.saves.drain(timeout)

    def shutdown(self) -> None:
        """Returns within ``connector.save_timeout_s`` (plus the async loads' own load timeouts): saves still
        queued then are cancelled, not waited for."""
        cancelled = self.saves.close(self.cfg.connector.save_timeout_s)
        if cancelled:
            log.warning("kvtier: shutdown cancelled %d queued saves after %.0f s", cancelled,
                        self.cfg.connector.save_timeout_s)
        self.load_pool.shutdown(wait=False, cancel_futures=True)
        if self.placement is not None:
            self.placement.flush(min(5.0, self.cfg.connector.save_timeout_s))
            self.placement.close()
        self.stack.close()
