"""Worker-side connector: loads into the blocks vLLM allocated, saves computed blocks, reports back.

Saves: the blocks named in the step's metadata are gathered into host memory at the end of the step
(``wait_for_save``), so vLLM may reuse them right away; encoding and storing run on a thread pool.
Loads: blocks are fetched from the tiers in parallel, verified (checksum, key, size) and copied into vLLM's
blocks. A block that is missing, corrupt or of the wrong size fails its request's load from that block on;
the failed block ids go to ``get_block_ids_with_load_errors`` so vLLM recomputes them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvtier.config import KVTierConfig
from kvtier.connector.metadata import KVTierMetadata, KVTierWorkerMeta, LoadSpec, stats_delta
from kvtier.tiers.stack import TierStack
from kvtier.transfer import KVLayout

if TYPE_CHECKING:
    from kvtier.attention.feed import ScoreFeed

log = logging.getLogger("kvtier.worker")


class WorkerSide:
    def __init__(self, cfg: KVTierConfig, num_blocks: int | None = None) -> None:
        self.cfg = cfg
        self.num_blocks = num_blocks
        self._events: list[tuple[bytes, str | None]] = []
        self._events_lock = threading.Lock()
        self.stack = TierStack.from_config(cfg, on_change=self._on_change)
        self.layout: KVLayout | None = None
        self.scores: ScoreFeed | None = None  # attention-score feed, set by attach_attention
        threads = max(1, cfg.connector.transfer_threads)
        # Separate pools: a load (on the request's critical path) never queues behind background saves.
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="kvtier-save")
        self.load_pool = ThreadPoolExecutor(threads, thread_name_prefix="kvtier-load")
        self._saves: list[Future[None]] = []
        self._async_loads: dict[str, Future[set[int]]] = {}
        self._load_errors: set[int] = set()
        self._counters: dict[str, float] = {}
        self._reported: dict[str, float] = {}
        self._counters_lock = threading.Lock()
        self._stats_file = os.environ.get("KVTIER_STATS_FILE")  # benchmarks read the counters from here
        with self._events_lock:  # everything restored from a previous run is news to the scheduler
            self._events.extend((key, tier.name) for tier in reversed(self.stack.tiers) for key in tier.keys())
        self.exporter = None
        if cfg.metrics.prometheus_port is not None:  # standalone /metrics on 127.0.0.1 (kvtier/prom.py)
            from kvtier.prom import start_exporter

            self.exporter = start_exporter(cfg.metrics.prometheus_port, self.stack, lambda: dict(self._counters))

    def _on_change(self, key: bytes, tier: str | None) -> None:
        with self._events_lock:
            self._events.append((key, tier))

    def _count(self, **values: float) -> None:
        with self._counters_lock:
            for name, value in values.items():
                self._counters[name] = self._counters.get(name, 0) + value

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.layout = KVLayout(kv_caches, self.num_blocks)
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
            self.scores.on_loads(meta.loads)
        for spec in meta.loads:
            if spec.is_async:
                self._async_loads[spec.req_id] = self.load_pool.submit(self._load, spec)
            else:
                self._load_errors |= self._load(spec, parallel=True)

    def _load(self, spec: LoadSpec, parallel: bool = False) -> set[int]:
        """Load one request's blocks; returns the block ids that failed (from the first failure on)."""
        assert self.layout is not None, "register_kv_caches was not called"
        start = time.perf_counter()
        fetched = list(self.load_pool.map(self._fetch, spec.keys)) if parallel else [self._fetch(k) for k in spec.keys]
        good = 0
        while good < len(fetched) and fetched[good] is not None:
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

    def _fetch(self, key: bytes) -> tuple[bytes, str] | None:
        assert self.layout is not None
        found = self.stack.get(key)
        if found is None or len(found[0]) != self.layout.block_bytes:
            return None
        return found

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads are complete when start_load_kv returns (sync) or reported via get_finished (async)."""

    # ---- saves -------------------------------------------------------------------------------------
    def wait_for_save(self, meta: KVTierMetadata) -> None:
        if not meta.saves or self.layout is None:
            if self.scores is not None:
                self.scores.on_step_end(meta, None)
            return
        start = time.perf_counter()
        keys = [key for key, _ in meta.saves]
        host = self.layout.gather([block_id for _, block_id in meta.saves])
        self._count(gather_time_s=time.perf_counter() - start)
        self._saves = [f for f in self._saves if not f.done()]
        self._saves.append(self.pool.submit(self._store, keys, host))
        if self.scores is not None:  # attention scores, sinks, links: applied once this store has landed
            self.scores.on_step_end(meta, self._saves[-1])

    def _store(self, keys: list[bytes], host: torch.Tensor) -> None:
        start = time.perf_counter()
        arr = host.numpy()
        stored = 0
        for i, key in enumerate(keys):
            try:
                ok = self.stack.put(key, memoryview(arr[i]))
            except Exception as exc:  # a save must never take the engine down
                log.warning("kvtier: save failed: %s", exc)
                ok = False
            if ok:
                stored += 1
            else:
                self._on_change(key, None)
        self._count(saved_blocks=stored, save_failed_blocks=len(keys) - stored,
                    saved_bytes=stored * host.shape[1], save_time_s=time.perf_counter() - start)

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

    def stats_data(self) -> dict[str, Any] | None:
        with self._counters_lock:
            now = dict(self._counters)
        if self.scores is not None:
            now.update(self.scores.counters())
        for tier, counters in self.stack.metrics.snapshot().items():
            for name, value in counters.items():
                now[f"{tier}.{name}"] = value
        delta = stats_delta(now, self._reported)
        self._reported = now
        if delta or not os.path.exists(self._stats_file or "."):
            self.write_stats_file()
        return delta or None

    def write_stats_file(self) -> None:
        """If $KVTIER_STATS_FILE is set, write the cumulative counters there as JSON (atomically)."""
        if not self._stats_file:
            return
        with self._counters_lock:
            data = {"counters": dict(self._counters), "tiers": self.stack.metrics.snapshot(),
                    "usage": self.stack.usage()}
        if self.scores is not None:
            data["counters"].update(self.scores.counters())
        tmp = f"{self._stats_file}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self._stats_file)
        except OSError as exc:
            log.warning("kvtier: cannot write stats to %s: %s", self._stats_file, exc)
            self._stats_file = None

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
        self.write_stats_file()
        self.stack.close()
