"""Worker-side connector: loads into the blocks vLLM allocated, saves computed blocks, reports back.

Every copy between vLLM's KV cache and the tiers goes through one staging pool allocated at start-up (pinned
on CUDA; ``connector.staging_bytes``) and is issued asynchronously (kvtier/transfer/).
Saves: at the end of a step (``wait_for_save``) the step's saved blocks are copied out on a side stream and the
step returns at once; the blocks stay protected until their copies are done (the delayed-release protocol in
saving.py: request_finished -> True, finished_sending from get_finished, fences on preemption). Once a copy is
done, encoding and storing run on the save queue, which holds at most ``connector.max_pending_save_bytes`` of
records (beyond it a save is dropped and counted).
Loads: blocks are fetched from the tiers in parallel, verified (checksum, key, size), staged and copied into
vLLM's blocks on a load stream; the forward waits for them on the device (before it starts, or per layer with
``connector.layerwise_load``), async loads are reported in get_finished once their copies are done. A block
that is missing, corrupt or of the wrong size fails its request's load from that block on, and anything that
goes wrong in a load fails all of its blocks: the failed block ids always reach
``get_block_ids_with_load_errors`` (sync and async loads alike), so vLLM recomputes them and never runs on
whatever its blocks held before.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvtier.config import KVTierConfig
from kvtier.connector.counters import Counters
from kvtier.connector.loading import StagedLoads, runs_map
from kvtier.connector.metadata import KVTierMetadata, KVTierWorkerMeta, LoadSpec
from kvtier.connector.placement import StartupPlacement
from kvtier.connector.savequeue import SaveQueue
from kvtier.connector.saving import AsyncSaves, Then
from kvtier.hostmem import keep_freed_memory
from kvtier.keys import rank_key
from kvtier.sharing import SharedPlacement
from kvtier.tiers.stack import TierStack
from kvtier.transfer import DoneFence, Fence, FenceFactory, FenceWatcher, KVCopier, KVLayout, StagingPool

if TYPE_CHECKING:
    from kvtier.attention.feed import ScoreFeed

log = logging.getLogger("kvtier.worker")
IDLE_WAIT_S = 0.005  # longest an idle step waits in get_finished for an async load (a new request waits as long)


class WorkerSide:
    def __init__(self, cfg: KVTierConfig, num_blocks: int | None = None, rank: int = 0, world: int = 1,
                 fences: FenceFactory | None = None, fence_every_step: bool = False) -> None:
        """``fences`` replaces the copy fences (tests hold copies "in flight" with it); ``fence_every_step``
        orders each step after every save copy in flight (attention types that free blocks of running
        requests)."""
        self.cfg = cfg
        self.num_blocks = num_blocks
        keep_freed_memory(int(cfg.connector.keep_freed_memory))
        self.rank, self.world = rank, world  # this worker stores its shard of each block under rank_key(key)
        self._fence_factory = fences
        self.fence_every_step = fence_every_step
        # Set by register_kv_caches: the staging pool, the device copies, their completion, saves and loads.
        self.pool: StagingPool | None = None
        self.copier: KVCopier | None = None
        self.watcher: FenceWatcher | None = None
        self.saver: AsyncSaves | None = None
        self.loader: StagedLoads | None = None
        self._layer_fences: dict[str, Fence] = {}  # this step's sync loads, per layer
        self._step_fence: Fence | None = None  # covers every sync load of this step
        self._events: list[tuple[bytes, str | None]] = []
        self._events_lock = threading.Lock()
        threads = cfg.connector.transfer_threads
        self.saves = SaveQueue(threads, cfg.connector.max_pending_save_bytes, nice=cfg.connector.save_nice,
                               idle=cfg.connector.save_idle)
        # Promotions after a lower-tier hit run with the saves, never on the request's path.
        self.stack = TierStack.from_config(cfg, on_change=self._on_change, background=self._background)
        self.layout: KVLayout | None = None
        self.scores: ScoreFeed | None = None  # attention-score feed, set by attach_attention
        # Separate pools: a load (on the request's critical path) never queues behind background saves.
        self.load_pool = ThreadPoolExecutor(threads, thread_name_prefix="kvtier-load")
        self.load_threads = threads
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
        if self.pool is not None:
            extra = {**extra, "staging_waits": self.pool.waits, "staging_timeouts": self.pool.timeouts}
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
        conn = self.cfg.connector
        self.pool = StagingPool(self.layout.block_bytes, int(conn.staging_bytes), int(conn.staging_chunk_bytes),
                                pin=self.layout.is_cuda)
        self.copier = KVCopier(self.layout, self.pool, self._fence_factory)
        self.watcher = FenceWatcher()
        self.saver = AsyncSaves(self.copier, self.watcher, self._queue_store, self._drop_saves, self.counters)
        self.loader = StagedLoads(self.copier, self.watcher)
        log.info("kvtier: registered KV caches: %s; staging: %d chunks of %d blocks%s", self.layout.describe(),
                 self.pool.count, self.pool.chunk_blocks, " (pinned)" if self.pool.pinned else "")

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

        return dataclasses.replace(  # the other fields (request ids, flags) are the same on every rank
            meta, loads=[LoadSpec(s.req_id, [shard(k) for k in s.keys], s.block_ids, s.is_async) for s in meta.loads],
            saves=[(shard(k), b) for k, b in meta.saves], sinks=[shard(k) for k in meta.sinks],
            links=[(shard(c), shard(p)) for c, p in meta.links])

    # ---- loads -------------------------------------------------------------------------------------
    def start_load_kv(self, meta: KVTierMetadata) -> None:
        meta = self.local(meta)
        if meta.clear_store:
            self.stack.clear()  # forgets at once; local storage is freed in the background
        if self.scores is not None:
            self.scores.on_loads([list(zip(spec.keys, spec.block_ids, strict=False)) for spec in meta.loads])
        if not meta.loads:
            return
        after = self.copier.compute_mark() if self.copier is not None else DoneFence()  # blocks' previous users
        for spec in meta.loads:
            if spec.is_async:
                self._async_loads[spec.req_id] = self.load_pool.submit(self._load, spec, after, True)
            else:
                self._load_errors |= self._load(spec, after, False)
        if self._step_fence is not None and self.copier is not None and not self.cfg.connector.layerwise_load:
            self.copier.guard_compute(self._step_fence)  # the forward starts once the loads have landed

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Layer-wise loading: the compute stream waits for this layer's copies (the host does not)."""
        if self.copier is None or self._step_fence is None or not self.cfg.connector.layerwise_load:
            return
        self.copier.guard_compute(self._layer_fences.get(layer_name, self._step_fence))

    def _load(self, spec: LoadSpec, after: Fence, is_async: bool) -> set[int]:
        """Load one request's blocks; returns the block ids that failed (from the first failure on, or all of
        them when anything went wrong). Never raises. An async load returns once its copies are done."""
        start = time.perf_counter()
        try:
            good, sources, fences = self._copy_in(spec, after, parallel=not is_async)
        except Exception as exc:  # whatever failed, vLLM recomputes every block of this load
            log.warning("kvtier: load of request %s failed (%s: %s); vLLM recomputes its %d blocks", spec.req_id,
                        type(exc).__name__, exc, len(spec.block_ids))
            good, sources = 0, []
            # Copies issued before the failure still land: whatever writes these blocks next waits for them.
            fences = [self.copier.loads_mark()] if self.copier is not None else []
        if fences and is_async:
            fences[-1].wait()
        elif fences and self.layout is not None:
            self._step_fence = fences[-1]
            self._layer_fences.update((layer.name, fences[min(i, len(fences) - 1)])
                                      for i, layer in enumerate(self.layout.layers))
        for tier in sources:
            self.counters.add(**{f"loaded_blocks.{tier}": 1})
        block_bytes = self.layout.block_bytes if self.layout is not None else 0
        self.counters.add(loaded_blocks=good, load_failed_blocks=len(spec.keys) - good,
                          loaded_bytes=good * block_bytes, load_time_s=time.perf_counter() - start)
        if good < len(spec.keys):
            log.info("kvtier: request %s: %d of %d blocks failed to load; vLLM recomputes them",
                     spec.req_id, len(spec.keys) - good, len(spec.keys))
        return set(spec.block_ids[good:])

    def _copy_in(self, spec: LoadSpec, after: Fence, parallel: bool) -> tuple[int, list[str], list[Fence]]:
        """Fetch, verify and copy in the longest loadable prefix: (blocks loaded, the tier of each, fences)."""
        if self.layout is None or self.loader is None:
            raise RuntimeError("register_kv_caches was not called")
        if len(spec.keys) != len(spec.block_ids):
            raise ValueError(f"{len(spec.keys)} keys for {len(spec.block_ids)} blocks")
        self._await_saves(spec.keys)
        map_fn = functools.partial(runs_map, self.load_pool, self.load_threads) if parallel else map
        if self.copier is not None and self.copier.direct:  # host KV caches: records land in their blocks
            served = self.stack.load_many(spec.keys, self.loader.placer(spec.block_ids), map_fn)
            good = next((i for i, tier in enumerate(served) if tier is None), len(served))
            return good, [tier for tier in served[:good] if tier is not None], [DoneFence() for _ in self.layout.layers]
        fetched = self.stack.get_many(spec.keys, map_fn)
        good = 0
        while good < len(fetched) and fetched[good] is not None and len(fetched[good][0]) == self.layout.block_bytes:
            good += 1
        found = [f for f in fetched[:good] if f is not None]
        fences = self.loader.copy(spec.block_ids[:good], [raw for raw, _ in found], after) if good else []
        return good, [tier for _, tier in found], fences

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
        """End of step: start copying this step's saves out, never waiting for the device."""
        meta = self.local(meta)
        self._layer_fences.clear()
        self._step_fence = None
        # attention scores, sinks, links of this step: applied by the job that stores its blocks, right after
        # them (so the policy sees them in step order), or now when nothing is stored
        then = self.scores.on_step_end(meta.saves, meta.sinks, meta.links) if self.scores is not None else None
        future = None
        if meta.saves and self.saver is not None and self.layout is not None:
            start = time.perf_counter()
            keys = [key for key, _ in meta.saves]
            if self.saves.held_bytes + len(keys) * self.layout.block_bytes > self.saves.max_bytes:
                self._drop_saves(keys)  # the store is behind: no copy either
            else:
                future = self.saver.issue(meta.saves, meta.save_reqs, then)
                if future is not None:
                    then = None  # the store job runs it
                    self._track(keys, future)  # a load of these keys waits for their copy and store
            self.counters.add(gather_time_s=time.perf_counter() - start)
        if then is not None:
            then()
        if future is not None and self.cfg.connector.sync_saves:  # stored (and scored) before the step ends
            try:
                future.result(timeout=self.cfg.connector.save_timeout_s)
            except Exception as exc:
                log.warning("kvtier: a synchronous save did not finish: %s", exc)

    def handle_preemptions(self, meta: KVTierMetadata) -> None:
        """Before the forward: blocks freed by preemption may be rewritten in this step; order every writer
        after the copies in flight out of them."""
        if self.saver is not None and (meta.preempted or self.fence_every_step):
            self.saver.fence(meta.preempted, everything=self.fence_every_step)

    def _queue_store(self, keys: list[bytes], records: np.ndarray,
                     then: Then | None = None) -> Future[None] | None:
        future = self.saves.submit(lambda: self._store(keys, records, then), records.nbytes)
        if future is None:
            self._drop_saves(keys)
        return future

    def _drop_saves(self, keys: list[bytes]) -> None:
        self.counters.add(save_dropped_blocks=len(keys))
        for key in keys:
            self._on_change(key, None)  # the scheduler stops waiting for them

    def _store(self, keys: list[bytes], records: np.ndarray, then: Then | None = None) -> None:
        try:
            self._put(keys, records)
        finally:
            if then is not None:
                then()

    def _put(self, keys: list[bytes], records: np.ndarray) -> None:
        start = time.perf_counter()
        try:
            results = self.stack.put_many([(key, memoryview(records[i])) for i, key in enumerate(keys)])
        except Exception as exc:  # a save must never take the engine down
            log.warning("kvtier: save failed: %s", exc)
            results = [False] * len(keys)
        for key, ok in zip(keys, results):
            if not ok:
                self._on_change(key, None)
        stored = sum(results)
        self.counters.add(saved_blocks=stored, save_failed_blocks=len(keys) - stored,
                          saved_bytes=stored * records.shape[1], save_time_s=time.perf_counter() - start)

    # ---- completion and reporting ------------------------------------------------------------------
    def get_finished(self, finished_req_ids: set[str],
                     meta: KVTierMetadata | None = None) -> tuple[set[str] | None, set[str] | None]:
        """(finished_sending, finished_recving): requests whose delayed release is due (announced in
        ``meta.release_after_saves``, no copy of theirs in flight) and async loads whose copies are done."""
        announced = meta.release_after_saves if meta is not None else []
        sending = self.saver.finished_sending(announced) if self.saver is not None else set(announced)
        if meta is not None and meta.idle and self._async_loads and not sending:
            # An idle step: vLLM would call again at once, its loop holding the GIL the load threads need
            # (measured: 2-4x the TTFT of sync loads under concurrency). Wait for the first load instead.
            wait(list(self._async_loads.values()), timeout=IDLE_WAIT_S, return_when=FIRST_COMPLETED)
        done = {rid for rid, fut in self._async_loads.items() if fut.done()}
        for rid in done:
            self._load_errors |= self._async_loads.pop(rid).result()  # _load never raises
        return (sending or None), (done or None)

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
        """Wait for save copies, queued saves and promotions; False when ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.saver is not None and not self.saver.flush(timeout):
            return False
        return self.saves.drain(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def shutdown(self) -> None:
        """Returns within ``connector.save_timeout_s`` (plus the async loads' own load timeouts): save copies
        still in flight and saves still queued then are dropped or cancelled, not waited for."""
        budget = self.cfg.connector.save_timeout_s
        deadline = time.monotonic() + budget
        if self.saver is not None and self.watcher is not None:
            self.saver.flush(budget)
            lost = self.watcher.close(max(0.0, deadline - time.monotonic()))
            if lost:
                log.warning("kvtier: shutdown dropped %d save copies still in flight after %.0f s", lost, budget)
        cancelled = self.saves.close(max(0.0, deadline - time.monotonic()))
        if cancelled:
            log.warning("kvtier: shutdown cancelled %d queued saves after %.0f s", cancelled, budget)
        self.load_pool.shutdown(wait=False, cancel_futures=True)
        if self.placement is not None:
            self.placement.flush(min(5.0, self.cfg.connector.save_timeout_s))
            self.placement.close()
        self.stack.close()
