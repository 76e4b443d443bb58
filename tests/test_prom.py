"""Prometheus metrics: vLLM's connector-metrics hook and the standalone exporter, fed by a real WorkerSide.

The exporter is scraped over HTTP on 127.0.0.1; the text is parsed with prometheus_client's parser and checked
against promtool-style naming rules.
"""

from __future__ import annotations

import logging
import re
import socket
import types
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from servers import free_ports
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorProm, KVConnectorPromMetrics

from kvtier import prom
from kvtier.config import KVTierConfig
from kvtier.connector.metadata import KVTierMetadata, LoadSpec
from kvtier.connector.worker import WorkerSide

LABELS = ["model_name", "engine"]
NUM_BLOCKS, HEADS, BLOCK, HEAD = 16, 2, 16, 32  # one block = 2 layers * 2*16*64 bf16 = 8 KiB
UNIT_ABBREVIATIONS = {"ms", "us", "ns", "sec", "secs", "s", "kb", "mb", "gb", "kib", "mib", "gib", "b",
                      "milliseconds", "microseconds", "nanoseconds", "minutes", "hours", "kilobytes", "megabytes"}


# ---- helpers ------------------------------------------------------------------------------------------------

def lint(text: str) -> list[str]:
    """promtool-style checks on an exposition: names, help, counter suffixes, base units, histogram shape."""
    problems: list[str] = []
    seen: set[str] = set()
    for fam in text_string_to_metric_families(text):
        name = fam.name
        if name.endswith("_created"):
            continue  # prometheus_client's own creation-time series
        if name in seen:
            problems.append(f"{name}: duplicate family")
        seen.add(name)
        if not re.fullmatch(r"kvtier_[a-z0-9]+(_[a-z0-9]+)*", name):
            problems.append(f"{name}: not a snake_case kvtier_* name (colons are for recording rules)")
        if not fam.documentation:
            problems.append(f"{name}: no help text")
        tokens = name.split("_")
        if UNIT_ABBREVIATIONS & set(tokens):
            problems.append(f"{name}: abbreviated or non-base unit")
        if {"counter", "gauge", "histogram", "summary"} & set(tokens):
            problems.append(f"{name}: metric type in the name")
        for unit in ("seconds", "bytes"):
            if unit in tokens and tokens[-1] != unit:
                problems.append(f"{name}: unit {unit} must be the last word (before _total)")
        if fam.type == "counter":
            if any(s.name != name + "_total" for s in fam.samples):
                problems.append(f"{name}: counter samples must end in _total")
        elif name.endswith("_total"):
            problems.append(f"{name}: only counters end in _total")
        if fam.type != "histogram" and name.endswith(("_bucket", "_count", "_sum")):
            problems.append(f"{name}: reserved histogram suffix")
        if fam.type == "histogram":
            problems.extend(_histogram_problems(name, fam.samples))
    return problems


def _histogram_problems(name: str, samples: list[Any]) -> list[str]:
    problems: list[str] = []
    series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    counts: dict[tuple[tuple[str, str], ...], float] = {}
    for s in samples:
        labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
        if s.name == name + "_bucket":
            series.setdefault(labels, []).append((float(s.labels["le"]), s.value))
        elif s.name == name + "_count":
            counts[labels] = s.value
    for labels, buckets in series.items():
        values = [v for _, v in sorted(buckets)]
        if values != sorted(values) or max(buckets)[0] != float("inf"):
            problems.append(f"{name}{dict(labels)}: buckets not cumulative or no +Inf")
        if counts.get(labels) != values[-1]:
            problems.append(f"{name}{dict(labels)}: _count differs from the +Inf bucket")
    return problems


def values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels without model/engine): value} of the kvtier samples in ``text``."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("kvtier_") and not s.name.endswith("_created"):
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in LABELS))
                out[(s.name, labels)] = s.value
    return out


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def make_cfg(tmp_path: Path, port: int | None) -> KVTierConfig:
    return KVTierConfig.from_dict({
        "tiers": [
            {"kind": "dram", "capacity": "24KiB", "page_size": "4KiB", "pin_memory": "never"},
            {"kind": "disk", "capacity": "1MiB", "path": str(tmp_path / "disk"), "codec": "lz4"},
        ],
        "metrics": {"prometheus_port": port},
    }, env={})


def make_caches() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"layer{i}": torch.randn(NUM_BLOCKS, HEADS, BLOCK, 2 * HEAD, generator=gen).to(torch.bfloat16)
            for i in range(2)}


def hook_metrics() -> KVConnectorPromMetrics:
    """What vLLM's PrometheusStatLogger builds: KVConnectorProm -> KVTierConnector.build_prom_metrics."""
    transfer = KVTransferConfig(kv_connector="KVTierConnector", kv_connector_module_path="kvtier.connector",
                                kv_role="kv_both")
    built = KVConnectorProm(types.SimpleNamespace(kv_transfer_config=transfer), LABELS, {0: ["tiny", "0"]})
    assert built.prom_metrics is not None
    return built.prom_metrics


@pytest.fixture
def worker(tmp_path: Path) -> Any:
    side = WorkerSide(make_cfg(tmp_path, free_ports(1)[0]), NUM_BLOCKS)
    side.register_kv_caches(make_caches())
    yield side
    side.shutdown()
    if side.exporter is not None:
        side.exporter.close()


def run_traffic(side: WorkerSide) -> None:
    """Save blocks 1-6 (the 24 KiB DRAM tier holds 2, the rest spill to disk), then load them into 9-14,
    plus one key nobody stored (a failed block)."""
    keys = [bytes([i]) * 16 for i in range(1, 7)]
    side.wait_for_save(KVTierMetadata(saves=[(k, i + 1) for i, k in enumerate(keys)]))
    side.drain()
    side.start_load_kv(KVTierMetadata(loads=[LoadSpec("r1", keys, list(range(9, 15))),
                                             LoadSpec("r2", [b"\xee" * 16], [15])]))
    side.drain()  # promotions of the disk hits run in the background


# ---- the vLLM hook ------------------------------------------------------------------------------------------

def test_vllm_hook_builds_kvtier_metrics_and_counts_deltas() -> None:
    metrics = hook_metrics()
    assert isinstance(metrics, prom.KVTierPromMetrics) and isinstance(metrics, KVConnectorPromMetrics)
    # Two steps' stats deltas, as the worker reports them: counters add up across observe calls.
    metrics.observe({"dram.hits": 3, "disk.hits": 1, "all.misses": 2, "loaded_blocks": 4, "loaded_blocks.disk": 1,
                     "load_time_s": 0.25, "saved_bytes": 8192, "bogus_key": 7, "disk.errors": 0})
    metrics.observe({"dram.hits": 2, "loaded_blocks": 2, "load_time_s": 0.5, "dram.bytes_written": 100})
    got = values(generate_latest(REGISTRY).decode())
    assert got[("kvtier_tier_hits_total", (("tier", "dram"),))] == 5
    assert got[("kvtier_tier_hits_total", (("tier", "disk"),))] == 1
    assert got[("kvtier_tier_misses_total", (("tier", "all"),))] == 2
    assert got[("kvtier_tier_loaded_blocks_total", (("tier", "disk"),))] == 1
    assert got[("kvtier_loaded_blocks_total", ())] == 6
    assert got[("kvtier_load_seconds_total", ())] == pytest.approx(0.75)
    assert got[("kvtier_saved_bytes_total", ())] == 8192
    assert got[("kvtier_tier_written_bytes_total", (("tier", "dram"),))] == 100
    assert ("kvtier_tier_errors_total", (("tier", "disk"),)) not in got  # zero deltas create no series
    text = generate_latest(REGISTRY).decode()
    assert 'kvtier_tier_hits_total{engine="0",model_name="tiny",tier="dram"} 5.0' in text
    assert lint("\n".join(line for line in text.splitlines() if "kvtier_" in line) + "\n") == []


def test_vllm_hook_can_be_built_again_in_the_same_process() -> None:
    hook_metrics().observe({"dram.hits": 9})
    again = hook_metrics()  # a second engine: no "Duplicated timeseries", counters start from zero
    again.observe({"dram.hits": 1})
    assert values(generate_latest(REGISTRY).decode())[("kvtier_tier_hits_total", (("tier", "dram"),))] == 1


def test_vllm_hook_sets_occupancy_gauges_when_stats_carry_usage() -> None:
    metrics = hook_metrics()
    metrics.observe({"usage": {"dram": {"blocks": 3, "used_bytes": 3000, "capacity": 4096}}})
    got = values(generate_latest(REGISTRY).decode())
    assert got[("kvtier_tier_blocks", (("tier", "dram"),))] == 3
    assert got[("kvtier_tier_used_bytes", (("tier", "dram"),))] == 3000
    assert got[("kvtier_tier_capacity_bytes", (("tier", "dram"),))] == 4096


def test_counter_samples_map_every_stats_key_kind() -> None:
    samples = prom.counter_samples({"disk.bytes_read": 10, "loaded_blocks.s3": 2, "save_time_s": 1.5,
                                    "my.tier.hits": 1, "unknown": 3, "disk.not_a_counter": 4, "usage": {}})
    assert set(samples) == {prom.Sample("kvtier_tier_read_bytes", "disk", 10.0),
                            prom.Sample("kvtier_tier_loaded_blocks", "s3", 2.0),
                            prom.Sample("kvtier_save_seconds", None, 1.5),
                            prom.Sample("kvtier_tier_hits", "my.tier", 1.0)}


# ---- the standalone exporter, fed by a real worker ----------------------------------------------------------

def test_exporter_serves_the_workers_counters_over_http(worker: WorkerSide) -> None:
    assert worker.exporter is not None
    run_traffic(worker)
    got = values(scrape(worker.exporter.port))
    block_bytes = 2 * HEADS * BLOCK * 2 * HEAD * 2
    assert got[("kvtier_saved_blocks_total", ())] == 6
    assert got[("kvtier_saved_bytes_total", ())] == 6 * block_bytes
    assert got[("kvtier_loaded_blocks_total", ())] == 6
    assert got[("kvtier_loaded_bytes_total", ())] == 6 * block_bytes
    assert got[("kvtier_load_failed_blocks_total", ())] == 1
    assert got[("kvtier_tier_misses_total", (("tier", "all"),))] == 1
    hits = {t: got[("kvtier_tier_hits_total", (("tier", t),))] for t in ("dram", "disk")}
    loaded = {t: got[("kvtier_tier_loaded_blocks_total", (("tier", t),))] for t in ("dram", "disk")}
    assert hits == loaded and sum(hits.values()) == 6 and hits["disk"] >= 4
    assert got[("kvtier_tier_demotions_total", (("tier", "dram"),))] >= 4
    assert got[("kvtier_tier_promotions_total", (("tier", "disk"),))] == hits["disk"]
    # Occupancy gauges agree with the tiers themselves.
    for tier in worker.stack.tiers:
        assert got[("kvtier_tier_blocks", (("tier", tier.name),))] == len(tier)
        assert got[("kvtier_tier_used_bytes", (("tier", tier.name),))] == tier.used_bytes
        assert got[("kvtier_tier_capacity_bytes", (("tier", tier.name),))] == tier.capacity
    # Latency histograms: one get observation per hit, one put per stored record.
    gets = sum(v for (name, labels), v in got.items()
               if name == "kvtier_tier_operation_duration_seconds_count" and ("op", "get") in labels)
    assert gets == 6
    puts = got[("kvtier_tier_operation_duration_seconds_count", (("op", "put"), ("tier", "disk")))]
    assert puts == got[("kvtier_tier_puts_total", (("tier", "disk"),))]


def test_exporter_and_vllm_hook_agree_on_the_same_traffic(worker: WorkerSide) -> None:
    assert worker.exporter is not None
    run_traffic(worker)
    data = worker.stats_data()  # what get_kv_connector_stats ships to vLLM's front end
    assert data is not None
    metrics = hook_metrics()
    metrics.observe(data)
    hook = values(generate_latest(REGISTRY).decode())
    exported = values(scrape(worker.exporter.port))
    counters = {k: v for k, v in hook.items() if k[0].endswith("_total")}
    assert counters and all(exported[k] == pytest.approx(v) for k, v in counters.items())


def test_exporter_output_follows_naming_rules(worker: WorkerSide) -> None:
    assert worker.exporter is not None
    run_traffic(worker)
    text = scrape(worker.exporter.port)
    assert lint(text) == []
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    expected = {f"{m}": "counter" for m, _, _ in prom._counter_docs()}
    expected.update({m: "gauge" for m, _ in prom.USAGE_GAUGES.values()})
    expected[prom.LATENCY_HISTOGRAM[0]] = "histogram"
    assert families == expected


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_exporter_is_off_by_default_and_a_busy_port_is_not_fatal(tmp_path: Path) -> None:
    side = WorkerSide(make_cfg(tmp_path / "a", None))
    assert side.exporter is None
    side.shutdown()
    records = _Records()  # the "kvtier" logger does not propagate to the root, so caplog cannot see it
    logging.getLogger("kvtier.prom").addHandler(records)
    try:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            side = WorkerSide(make_cfg(tmp_path / "b", busy.getsockname()[1]))
            assert side.exporter is None
            assert any("cannot serve Prometheus metrics" in m for m in records.messages)
            side.shutdown()
    finally:
        logging.getLogger("kvtier.prom").removeHandler(records)


def test_a_second_worker_on_the_same_port_takes_over_the_exporter(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    first = WorkerSide(make_cfg(tmp_path / "a", port))
    first.shutdown()
    second = WorkerSide(make_cfg(tmp_path / "b", port))
    try:
        assert second.exporter is first.exporter and second.exporter is not None
        second.stack.put(b"\x01" * 16, b"x" * 100)
        got = values(scrape(port))
        assert got[("kvtier_tier_puts_total", (("tier", "dram"),))] == 1
    finally:
        second.shutdown()
        if second.exporter is not None:
            second.exporter.close()
