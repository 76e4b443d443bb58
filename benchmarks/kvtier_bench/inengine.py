"""Instruments inside a benchmark's engine process (vLLM in-process): the time spent in kvtier's connector
methods (``time_hooks``), the CPU time of kvtier's threads and the other threads' wait for a CPU (``sched`` /
``since``, from /proc/self/task/<tid>/schedstat), the bytes kvtier loaded (``loaded_bytes``) and the machine's
floor for loading them (``memory_floor``: one copy plus its checksum)."""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Every connector method vLLM calls while requests run (scheduler and worker side; the engine is in-process).
HOOKS = ("get_num_new_matched_tokens", "update_state_after_alloc", "get_external_cache_hit_sources",
         "build_connector_meta", "update_connector_output", "request_finished", "start_load_kv",
         "wait_for_layer_load", "save_kv_layer", "wait_for_save", "get_finished", "get_block_ids_with_load_errors",
         "build_connector_worker_meta", "get_kv_connector_stats", "handle_preemptions")


@dataclass
class Hooks:
    """Seconds spent in kvtier's connector methods (``total``), of which in ``start_load_kv`` (``load``: a
    synchronous load's fetch, verify and copy), and the worker-side connector (its counters)."""

    total: float = 0.0
    load: float = 0.0
    connector: Any = None


def time_hooks() -> Hooks:
    """Wrap kvtier's connector methods so the seconds spent in them add up in the returned ``Hooks``."""
    from kvtier.connector.connector import KVTierConnector

    spent = Hooks()

    def timed(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                took = time.perf_counter() - start
                spent.total += took
                if name == "start_load_kv":
                    spent.load += took
                    spent.connector = self
        return call

    for name in HOOKS:
        setattr(KVTierConnector, name, timed(name, getattr(KVTierConnector, name)))
    return spent


def memory_floor(nbytes: int, reps: int = 5) -> float:
    """Seconds this process takes, at best of ``reps``, to copy ``nbytes`` between two buffers it has touched
    before and checksum the copy (xxh3, the records' default): what any load of that many bytes from memory
    that verifies them costs at least on this machine (its memory bandwidth, not kvtier's code)."""
    import numpy as np
    import xxhash

    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        np.copyto(dst, src)
        xxhash.xxh3_64_intdigest(dst.data)
        best = min(best, time.perf_counter() - start)
    return best


Sched = tuple[dict[int, tuple[int, int]], set[int]]


def sched() -> Sched:
    """(CPU ns, ns spent waiting for a CPU) so far of every thread of this process, by thread id (from
    /proc/self/task/<tid>/schedstat), and the ids of kvtier's threads (named kvtier-*)."""
    kvtier = {t.native_id for t in threading.enumerate() if t.name.startswith("kvtier") and t.native_id is not None}
    times: dict[int, tuple[int, int]] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            cpu, wait = task.joinpath("schedstat").read_text().split()[:2]
            times[int(task.name)] = (int(cpu), int(wait))
        except (OSError, ValueError):  # the thread just ended, or no schedstat
            pass
    return times, kvtier


def since(before: Sched) -> tuple[float, float]:
    """Since ``before``: (CPU seconds kvtier's threads used, seconds the engine's other threads waited for a
    CPU). Threads started since count from zero."""
    now, kvtier = sched()
    old = before[0]
    cpu = sum(c - old.get(tid, (0, 0))[0] for tid, (c, _) in now.items() if tid in kvtier)
    wait = sum(w - old.get(tid, (0, 0))[1] for tid, (_, w) in now.items() if tid not in kvtier)
    return cpu / 1e9, wait / 1e9


def drain(connector: Any, timeout_s: float = 60.0) -> None:
    """Wait for the work a kvtier connector still has in flight (saves, promotions, deletes after a clear), so
    that it does not run into what is measured next. Nothing to wait for without one (None)."""
    if connector is not None and not connector.drain(timeout_s):
        raise RuntimeError(f"kvtier's background work did not finish within {timeout_s} s")


def loaded_bytes(hooks: Hooks | None) -> int:
    snap = hooks.connector.snapshot() if hooks is not None and hooks.connector is not None else None
    return int(snap["counters"].get("loaded_bytes", 0)) if snap else 0
