"""Worker-side connector: loads into the blocks vLLM allocated, saves computed blocks, reports back.

Saves: the blocks named in the step's metadata are gathered into host memory at the end of the step
(``wait_for_save``), so vLLM may reuse them right away; encoding and storing run on a thread pool.
Loads: blocks are fetched from the tiers in parallel, verified (checksum, key, size) and copied into vLLM's
blocks. A block that is missing, corrupt or of the wrong size fails its request's load from that block on;
the failed block ids go to ``get_block_ids_with_load_errors`` so vLLM recomputes them.
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
from kvtier.connector.metadata import KVTierMetadata, KVTierWorkerMeta, LoadSpec, stats_delta
from kvtier.connector.placement import StartupPlacement
from kvtier.tiers.stack import TierStack
from kvtier.transfer import KVLayout
from kvtier.units import format_size

if TYPE_CHECKING:
    from kvtier.attention.feed import ScoreFeed

log = logging.getLogger("kvtier.worker")


class WorkerSide:
    def __init__(self, cfg: KVTierConfig, num_blocks: int | None = None) -> None:
        self.cfg = cfg
        self.num_blocks = num_blocks
        self._events: list[tuple[bytes, str | None]] = []
        self._events_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max(1, cfg.connector.transfer_threads), thread_name_prefix="kvtier-save")
        # Promotions after a lower-tier hit run with the saves, never on the request's path.
        self.stack = TierStack.from_config(cfg, on_change=self._on_change, background=self._background)
        self.layout: KVLayout | None = None
        self.scores: ScoreFeed | None = None  # attention-score feed, set by attach_attention
        # Separate pools: a load (on the request's critical path) never queues behind background saves.
        self.load_pool = ThreadPoolExecutor(max(1, cfg.connector.transfer_threads), thread_name_prefix="kvtier-load")
        self._saves: list[Future[None]] = []
        self._async_loads: dict[str, Future[set[int]]] = {}
        self._load_errors: set[int] = set()
        self._counters: dict[str, float] = {}
        self._reported: dict[str, float] = {}
        self._last_log = time.monotonic()
        self._counters_lock = threading.Lock()
        self.exporter = None
        if cfg.metrics.prometheus_port is not None:  # standalone /metrics on 127.0.0.1 (kvtier/prom.py)
            from kvtier.prom import start_exporter

            self.exporter = start_exporter(cfg.metrics.prometheus_port, self.stack, lambda: dict(self._counters))

    def _background(self, job: Callable[[], None]) -> None:
        self._saves.append(self.pool.submit(job))

    def startup_placement(self) -> StartupPlacement:
        """What the persistent tiers held at start-up (restored by the stack), fastest tier first."""
        return StartupPlacement.pack((t.name, t.keys()) for t in self.stack.tiers if t.persistent)

    def _on_change(self, key: bytes, tier: str | None) -> None:
        with self._events_lock:
            self._events.append((key, tier))

    def _count(self, **values: float) -> None:
        with self._counters_lock:
            for name, value in values.items():
                self._counters[name] = self._counters.get(name, 0) + value

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

    # ---- loads -------------------------------------------------------------------------------------
    def start_load_kv(self, meta: KVTierMetadata) -> None:
        if meta.clear_store:
            self.drain()
            self.stack.clear()
        if self.scores is not None:
            self.scores.on_loads([list(zip(spec.keys, spec.block_ids, strict=False)) for spec in meta.loads])
        for spec in meta.loads:
            if spec.is_async:
                self._async_loads[spec.req_id] = self.load_pool.submit(self._load, spec)
            else:
                self._load_errors |= self._load(spec, parallel=True)

    def _load(self, spec: LoadSpec, parallel: bool = False) -> set[int]:
        """Load one request's blocks; returns the block ids that failed (from the first failure on)."""
        assert self.layout is not None, "register_kv_caches was not called"
        start = time.perf_counter()
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
        for i in range(good):
            self._count(**{f"loaded_blocks.{fetched[i][1]}": 1})  # type: ignore[index]
        self._count(loaded_blocks=good, load_failed_blocks=len(spec.keys) - good,
                    loaded_bytes=good * self.layout.block_bytes, load_time_s=time.perf_counter() - start)
        if good < len(spec.keys):
            log.info("kvtier: request %s: %d of %d blocks failed to load; vLLM recomputes them",
                     spec.req_id, len(spec.keys) - good, len(spec.keys))
        return set(spec.block_ids[good:])

    # ---- saves -------------------------------------------------------------------------------------
    def wait_for_save(self, meta: KVTierMetadata) -> None:
        # attention scores, sinks, links of this step: applied right after its blocks are stored
        then = self.scores.on_step_end(meta.saves, meta.sinks, meta.links) if self.scores is not None else None
        if not meta.saves or self.layout is None:
            if then is not None:
                then()
            return
        start = time.perf_counter()
        keys = [key for key, _ in meta.saves]
        host = self.layout.gather([block_id for _, block_id in meta.saves])
        self._count(gather_time_s=time.perf_counter() - start)
        if self.cfg.connector.sync_saves:  # stored (and scored) before the step's output is built
            self._store(keys, host, then)
            return
        self._saves = [f for f in self._saves if not f.done()]
        self._saves.append(self.pool.submit(self._store, keys, host, then))

    def _store(self, keys: list[bytes], host: torch.Tensor, then: Callable[[], None] | None = None) -> None:
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
        self._count(saved_blocks=stored, save_failed_blocks=len(keys) - stored,
                    saved_bytes=stored * host.shape[1], save_time_s=time.perf_counter() - start)
        if then is not None:
            then()

    # ---- completion and reporting ------------------------------------------------------------------
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done = {rid for rid, fut in self._async_loads.items() if fut.done()}
        for rid in done:
            try:
                self._load_errors |= self._async_loads.pop(rid).result()
            except Exception as exc:
                log.warning("kvtier: async load of %s failed: %s", rid, exc)
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
        """Cumulative counters: the connector's own (and attention capture's), per-tier counters, tier usage."""
        with self._counters_lock:
            counters = dict(self._counters)
        if self.scores is not None:
            counters.update(self.scores.counters())
        return {"counters": counters, "tiers": self.stack.metrics.snapshot(), "usage": self.stack.usage()}

    def stats_data(self) -> dict[str, Any] | None:
        """What changed since the last call, flat (``<tier>.<counter>`` for tier counters), or None."""
        snap = self.snapshot()
        self._maybe_log(snap)
        now = dict(snap["counters"])
        for tier, counters in snap["tiers"].items():
            for name, value in counters.items():
                now[f"{tier}.{name}"] = value
        delta = stats_delta(now, self._reported)
        self._reported = now
        return delta or None

    def _maybe_log(self, snap: dict[str, Any]) -> None:
        """One INFO line every ``metrics.log_interval_s`` (0 = never): what was loaded and saved, tier use."""
        interval = self.cfg.metrics.log_interval_s
        now = time.monotonic()
        if interval <= 0 or now - self._last_log < interval:
            return
        self._last_log = now
        c = snap["counters"]
        tiers = ", ".join(f"{name} {format_size(u['used_bytes'])}/{format_size(u['capacity'])} ({u['blocks']} blocks)"
                          for name, u in snap["usage"].items())
        log.info("kvtier: loaded %d blocks (%d failed), saved %d (%d failed); %s", c.get("loaded_blocks", 0),
                 c.get("load_failed_blocks", 0), c.get("saved_blocks", 0), c.get("save_failed_blocks", 0), tiers)

    def drain(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for fut in list(self._saves) + list(self._async_loads.values()):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                fut.result(timeout=remaining)
            except Exception as exc:
                log.warning("kvtier: transfer did not finish cleanly: %s", exc)
        self._saves = []

    def shutdown(self) -> None:
        self.drain(self.cfg.connector.save_timeout_s)
        self.pool.shutdown(wait=True)
        self.load_pool.shutdown(wait=True)
        self.stack.close()
