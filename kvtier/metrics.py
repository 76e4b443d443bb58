"""Counters kept by the store and the connector: per-tier hits, misses, bytes, evictions, errors, latencies.

Thread-safe, cheap (a lock and integer adds). The connector turns snapshots into vLLM KV-connector stats;
the Prometheus exporter reads the same snapshots.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict

COUNTER_NAMES = (
    "hits", "misses", "puts", "bytes_written", "bytes_read", "evictions", "demotions", "promotions",
    "promotions_skipped", "drops", "checksum_failures", "errors", "transit_hits",
)
# latency histogram bucket upper bounds, seconds
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, seconds: float) -> None:
        i = 0
        while i < len(LATENCY_BUCKETS) and seconds > LATENCY_BUCKETS[i]:
            i += 1
        self.counts[i] += 1
        self.total += seconds
        self.n += 1

    def snapshot(self) -> dict[str, object]:
        return {"buckets": list(LATENCY_BUCKETS), "counts": list(self.counts), "sum": self.total, "count": self.n}


class StoreMetrics:
    """Per-tier counters and get/put latency histograms."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, Counter[str]] = defaultdict(Counter)
        self._latency: dict[tuple[str, str], Histogram] = defaultdict(Histogram)

    def add(self, tier: str, name: str, value: int = 1) -> None:
        with self._lock:
            self._counters[tier][name] += value

    def observe(self, tier: str, op: str, seconds: float) -> None:
        with self._lock:
            self._latency[(tier, op)].observe(seconds)

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {tier: {n: c[n] for n in COUNTER_NAMES} for tier, c in self._counters.items()}

    def latency_snapshot(self) -> dict[str, dict[str, object]]:
        with self._lock:
            return {f"{tier}:{op}": h.snapshot() for (tier, op), h in self._latency.items()}
