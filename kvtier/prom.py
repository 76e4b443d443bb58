"""Prometheus metrics for kvtier, by two paths that expose the same names.

1. vLLM's connector-metrics hook: ``KVTierConnector.build_prom_metrics`` returns a ``KVTierPromMetrics``,
   which vLLM's front end feeds with the stats dict the worker produced (``WorkerSide.stats_data``: deltas of
   ``"<tier>.<counter>"`` and connector counters). The metrics appear on vLLM's own ``/metrics``, labelled with
   vLLM's ``model_name`` and ``engine`` plus ``tier``. vLLM only sends stats when it logs them (the server does
   by default; ``LLM(...)`` does not), and the dict carries counters only, so this path has no latency
   histograms, and occupancy gauges only if the dict holds a ``"usage"`` mapping (see ``usage_samples``).
2. A standalone exporter (config ``metrics.prometheus_port``): the worker starts an HTTP server on
   127.0.0.1:<port> whose collector reads the worker's own counters, the store's counters, latency histograms
   and tier occupancy at scrape time. It works whether or not vLLM logs stats.

Names follow the Prometheus conventions: everything starts with ``kvtier_``, counters end in ``_total``, byte
counts in ``_bytes``, durations are seconds. Misses are counted by the store as a whole (``tier="all"``),
because a miss is "no tier had it".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from kvtier.tiers.stack import TierStack

log = logging.getLogger("kvtier.prom")

PREFIX = "kvtier_"

# StoreMetrics counter -> (metric name without the _total suffix, help); labelled by tier.
TIER_COUNTERS: dict[str, tuple[str, str]] = {
    "hits": ("kvtier_tier_hits", "Blocks the tier served (after verification)."),
    "misses": ("kvtier_tier_misses", "Block lookups no tier could serve (tier=\"all\")."),
    "puts": ("kvtier_tier_puts", "Block records stored into the tier."),
    "bytes_read": ("kvtier_tier_read_bytes", "Record bytes read from the tier on hits."),
    "bytes_written": ("kvtier_tier_written_bytes", "Record bytes written into the tier."),
    "evictions": ("kvtier_tier_evictions", "Blocks the tier's policy evicted to make room."),
    "demotions": ("kvtier_tier_demotions", "Evicted blocks moved down to the next tier."),
    "promotions": ("kvtier_tier_promotions", "Blocks served by the tier and copied up into the top tier."),
    "promotions_skipped": ("kvtier_tier_promotions_skipped",
                           "Hits in the tier not copied up: promotions were not being hit before eviction."),
    "transit_hits": ("kvtier_tier_transit_hits", "Hits served from a block while it was being demoted from the tier."),
    "drops": ("kvtier_tier_drops", "Evicted blocks no lower tier took (gone from the store)."),
    "checksum_failures": ("kvtier_tier_checksum_failures", "Records that failed verification (treated as misses)."),
    "errors": ("kvtier_tier_errors", "Tier operations that failed (server down, I/O error, full, corrupt)."),
}
# Worker counter -> (metric name without _total, help); not labelled by tier.
CONNECTOR_COUNTERS: dict[str, tuple[str, str]] = {
    "loaded_blocks": ("kvtier_loaded_blocks", "Blocks loaded into vLLM's KV cache."),
    "load_failed_blocks": ("kvtier_load_failed_blocks", "Blocks that failed to load (vLLM recomputes them)."),
    "loaded_bytes": ("kvtier_loaded_bytes", "Raw KV bytes loaded into vLLM's KV cache."),
    "load_time_s": ("kvtier_load_seconds", "Time spent loading blocks (fetch, verify, copy)."),
    "saved_blocks": ("kvtier_saved_blocks", "Blocks saved into the store."),
    "save_failed_blocks": ("kvtier_save_failed_blocks", "Blocks no tier accepted."),
    "saved_bytes": ("kvtier_saved_bytes", "Raw KV bytes saved into the store."),
    "save_time_s": ("kvtier_save_seconds", "Time spent encoding and storing saved blocks (worker threads)."),
    "gather_time_s": ("kvtier_gather_seconds", "Time wait_for_save spent issuing the copies of saved blocks."),
    "save_dropped_blocks": ("kvtier_save_dropped_blocks", "Saves dropped (no staging or queue room, failed copy)."),
    "staging_dropped_blocks": ("kvtier_staging_dropped_blocks", "Saves dropped: the staging save share was full."),
    "staging_waits": ("kvtier_staging_waits", "Loads that found the staging pool full and waited for room."),
    "staging_timeouts": ("kvtier_staging_timeouts", "Loads that found no staging room in time (recomputed)."),
}
# Worker counter "<name>.<tier>" -> per-tier metric.
PER_TIER_CONNECTOR: dict[str, tuple[str, str]] = {
    "loaded_blocks": ("kvtier_tier_loaded_blocks", "Blocks loaded into vLLM's KV cache, by the tier that served them."),
}
# Occupancy (TierStack.usage) -> gauge.
USAGE_GAUGES: dict[str, tuple[str, str]] = {
    "used_bytes": ("kvtier_tier_used_bytes", "Bytes the tier holds (as it accounts them)."),
    "blocks": ("kvtier_tier_blocks", "Blocks the tier holds."),
    "capacity": ("kvtier_tier_capacity_bytes", "Configured tier capacity in bytes (0 = unbounded)."),
}
LATENCY_HISTOGRAM = ("kvtier_tier_operation_duration_seconds", "Duration of tier get/put operations.")


@dataclass(frozen=True)
class Sample:
    metric: str  # counter name without _total
    tier: str | None
    value: float


def counter_samples(data: Mapping[str, Any]) -> list[Sample]:
    """Map a stats dict (``WorkerSide.stats_data`` keys) to metric samples; unknown keys are skipped."""
    out: list[Sample] = []
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if key in CONNECTOR_COUNTERS:
            out.append(Sample(CONNECTOR_COUNTERS[key][0], None, float(value)))
            continue
        head, _, rest = key.partition(".")
        if rest and head in PER_TIER_CONNECTOR:
            out.append(Sample(PER_TIER_CONNECTOR[head][0], rest, float(value)))
            continue
        tier, _, counter = key.rpartition(".")
        if tier and counter in TIER_COUNTERS:
            out.append(Sample(TIER_COUNTERS[counter][0], tier, float(value)))
    return out


def usage_samples(usage: Any) -> list[Sample]:
    """Gauge samples from ``{tier: {"blocks": n, "used_bytes": n, "capacity": n}}`` (TierStack.usage())."""
    out: list[Sample] = []
    if not isinstance(usage, Mapping):
        return out
    for tier, values in usage.items():
        if not isinstance(values, Mapping):
            continue
        for field, (metric, _) in USAGE_GAUGES.items():
            value = values.get(field)
            if isinstance(value, int | float) and not isinstance(value, bool):
                out.append(Sample(metric, str(tier), float(value)))
    return out


def _counter_docs() -> Iterator[tuple[str, str, bool]]:
    """(name, help, labelled by tier) for every counter."""
    for metric, doc in TIER_COUNTERS.values():
        yield metric, doc, True
    for metric, doc in PER_TIER_CONNECTOR.values():
        yield metric, doc, True
    for metric, doc in CONNECTOR_COUNTERS.values():
        yield metric, doc, False


# ---- path 1: vLLM's KVConnectorPromMetrics hook -----------------------------------------------------------

def _unregister_kvtier_metrics() -> None:
    """Drop kvtier metrics a previous engine in this process registered (vLLM does the same for vllm:*)."""
    for collector in list(REGISTRY._collector_to_names):
        name = getattr(collector, "_name", "")
        if isinstance(name, str) and name.startswith(PREFIX):
            REGISTRY.unregister(collector)


class KVTierPromMetrics(KVConnectorPromMetrics):
    """Counters (and occupancy gauges when the stats carry ``usage``) on vLLM's /metrics."""

    def __init__(self, vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        if self._counter_cls is Counter:
            _unregister_kvtier_metrics()
        names = list(labelnames)
        self._counters: dict[str, Any] = {}
        self._tiered: dict[str, bool] = {}
        for metric, doc, tiered in _counter_docs():
            self._counters[metric] = self._counter_cls(
                name=metric, documentation=doc, labelnames=names + (["tier"] if tiered else []))
            self._tiered[metric] = tiered
        self._gauges: dict[str, Any] = {
            metric: self._gauge_cls(name=metric, documentation=doc, labelnames=names + ["tier"],
                                    multiprocess_mode="mostrecent")  # type: ignore[call-arg]
            for metric, doc in USAGE_GAUGES.values()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = [str(v) for v in self.per_engine_labelvalues.get(engine_idx, [])]
        for sample in counter_samples(transfer_stats_data):
            if sample.value <= 0:
                continue  # a counter only goes up; deltas are never negative unless a store was reset
            extra = [sample.tier] if self._tiered[sample.metric] and sample.tier is not None else []
            self._counters[sample.metric].labels(*labels, *extra).inc(sample.value)
        for sample in usage_samples(transfer_stats_data.get("usage")):
            self._gauges[sample.metric].labels(*labels, sample.tier).set(sample.value)


def build_prom_metrics(vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                       per_engine_labelvalues: dict[int, list[object]]) -> KVTierPromMetrics:
    return KVTierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


# ---- path 2: the standalone exporter ------------------------------------------------------------------------

class KVTierCollector(Collector):
    """Reads a TierStack and the worker's counters at scrape time."""

    def __init__(self, stack: TierStack, counters: Callable[[], Mapping[str, float]]) -> None:
        self.stack = stack
        self.counters = counters

    def collect(self) -> Iterable[Metric]:
        tiers = [t.name for t in self.stack.tiers]
        flat: dict[str, float] = {name: 0.0 for name in CONNECTOR_COUNTERS}
        for tier in tiers:
            flat.update({f"{tier}.{c}": 0.0 for c in TIER_COUNTERS if c != "misses"})
            flat.update({f"{c}.{tier}": 0.0 for c in PER_TIER_CONNECTOR})
        flat["all.misses"] = 0.0
        flat.update(self.counters())
        for tier, values in self.stack.metrics.snapshot().items():
            flat.update({f"{tier}.{name}": float(v) for name, v in values.items()
                         if (name == "misses") == (tier == "all")})
        yield from _counter_families(counter_samples(flat))
        yield from _gauge_families(usage_samples(self.stack.usage()))
        yield _latency_family(self.stack.metrics.latency_snapshot())


def _counter_families(samples: list[Sample]) -> Iterator[Metric]:
    for metric, doc, tiered in _counter_docs():
        family = CounterMetricFamily(metric, doc, labels=["tier"] if tiered else [])
        for s in samples:
            if s.metric == metric:
                family.add_metric([s.tier] if tiered and s.tier is not None else [], s.value)
        yield family


def _gauge_families(samples: list[Sample]) -> Iterator[Metric]:
    for metric, doc in USAGE_GAUGES.values():
        family = GaugeMetricFamily(metric, doc, labels=["tier"])
        for s in samples:
            if s.metric == metric:
                family.add_metric([s.tier or ""], s.value)
        yield family


def _latency_family(snapshot: Mapping[str, Mapping[str, Any]]) -> Metric:
    family = HistogramMetricFamily(LATENCY_HISTOGRAM[0], LATENCY_HISTOGRAM[1], labels=["tier", "op"])
    for name in sorted(snapshot):
        tier, _, op = name.rpartition(":")
        snap = snapshot[name]
        bounds = [float(b) for b in snap["buckets"]]
        running = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip([*bounds, float("inf")], snap["counts"]):
            running += int(count)
            buckets.append((floatToGoString(bound), running))
        family.add_metric([tier, op], buckets, float(snap["sum"]))
    return family


@dataclass
class Exporter:
    port: int
    registry: CollectorRegistry
    collector: KVTierCollector
    server: WSGIServer
    thread: threading.Thread

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        with _LOCK:
            if _EXPORTERS.get(self.port) is self:
                del _EXPORTERS[self.port]


# A port is a process-wide resource: a second worker in the same process (a new LLM after the first was shut
# down, in one-process mode) takes over the running exporter instead of failing to bind.
_EXPORTERS: dict[int, Exporter] = {}
_LOCK = threading.Lock()


def start_exporter(port: int, stack: TierStack, counters: Callable[[], Mapping[str, float]],
                   addr: str = "127.0.0.1") -> Exporter | None:
    """Serve kvtier metrics on http://addr:port/metrics (port 0 picks a free port). None if it cannot bind."""
    with _LOCK:
        running = _EXPORTERS.get(port) if port else None
        if running is not None:
            running.collector.stack, running.collector.counters = stack, counters
            return running
        registry = CollectorRegistry(auto_describe=False)
        collector = KVTierCollector(stack, counters)
        registry.register(collector)
        try:
            server, thread = start_http_server(port, addr=addr, registry=registry)
        except OSError as exc:
            log.warning("kvtier: cannot serve Prometheus metrics on %s:%d (%s); metrics.prometheus_port ignored",
                        addr, port, exc)
            return None
        exporter = Exporter(int(server.server_port), registry, collector, server, thread)
        _EXPORTERS[exporter.port] = exporter
    log.info("kvtier: Prometheus metrics on http://%s:%d/metrics", addr, exporter.port)
    return exporter
