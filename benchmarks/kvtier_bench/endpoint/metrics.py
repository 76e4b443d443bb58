"""vLLM's and kvtier's counters from a server's Prometheus ``/metrics`` text.

kvtier's connector puts its counters on vLLM's /metrics through vLLM's connector-metrics hook (kvtier/prom.py,
labels ``model_name``, ``engine`` and, per tier, ``tier``). They are turned back into the shape of the stats
file the engine driver reads (``{"counters": {...}, "tiers": {tier: {...}}, "usage": {...}}``, the worker's
``snapshot()``), so kvtier_bench.stats sums them the same way in both modes. Labelled series appear only
once they have counted something: a fresh server shows no ``kvtier_*`` line until kvtier has saved a block.
Samples are summed over engines (a data-parallel server has one ``engine`` label value per engine).

The names below mirror kvtier/prom.py (which this client does not import: it needs vLLM, the client does not);
tests/test_bench_endpoint.py checks that they agree.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

Samples = dict[str, list[tuple[dict[str, str], float]]]

# kvtier_<...>_total (not per tier) -> the worker's counter name.
CONNECTOR = {
    "kvtier_loaded_blocks_total": "loaded_blocks", "kvtier_load_failed_blocks_total": "load_failed_blocks",
    "kvtier_loaded_bytes_total": "loaded_bytes", "kvtier_load_seconds_total": "load_time_s",
    "kvtier_saved_blocks_total": "saved_blocks", "kvtier_save_failed_blocks_total": "save_failed_blocks",
    "kvtier_saved_bytes_total": "saved_bytes", "kvtier_save_seconds_total": "save_time_s",
    "kvtier_gather_seconds_total": "gather_time_s", "kvtier_save_dropped_blocks_total": "save_dropped_blocks",
    "kvtier_staging_dropped_blocks_total": "staging_dropped_blocks", "kvtier_staging_waits_total": "staging_waits",
    "kvtier_staging_timeouts_total": "staging_timeouts",
}
# kvtier_tier_loaded_blocks_total{tier=T} -> the worker's counter "loaded_blocks.T".
PER_TIER_CONNECTOR = {"kvtier_tier_loaded_blocks_total": "loaded_blocks"}
# kvtier_tier_<...>_total{tier=T} -> the store's per-tier counter.
TIER = {
    "kvtier_tier_hits_total": "hits", "kvtier_tier_misses_total": "misses", "kvtier_tier_puts_total": "puts",
    "kvtier_tier_read_bytes_total": "bytes_read", "kvtier_tier_written_bytes_total": "bytes_written",
    "kvtier_tier_evictions_total": "evictions", "kvtier_tier_demotions_total": "demotions",
    "kvtier_tier_promotions_total": "promotions", "kvtier_tier_promotions_skipped_total": "promotions_skipped",
    "kvtier_tier_transit_hits_total": "transit_hits",
    "kvtier_tier_drops_total": "drops", "kvtier_tier_checksum_failures_total": "checksum_failures",
    "kvtier_tier_errors_total": "errors",
}
# Occupancy gauges (present when kvtier's stats carry usage).
USAGE = {"kvtier_tier_used_bytes": "used_bytes", "kvtier_tier_blocks": "blocks",
         "kvtier_tier_capacity_bytes": "capacity"}

# vLLM's own counters kept per round (deltas); a labelled one is keyed "name{label=value}".
VLLM_COUNTERS = {
    "vllm:prompt_tokens_total": None, "vllm:generation_tokens_total": None,
    "vllm:prefix_cache_queries_total": None, "vllm:prefix_cache_hits_total": None,
    "vllm:external_prefix_cache_queries_total": None, "vllm:external_prefix_cache_hits_total": None,
    "vllm:prompt_tokens_cached_total": None, "vllm:num_preemptions_total": None,
    "vllm:prompt_tokens_by_source_total": "source", "vllm:prompt_tokens_cached_by_source_total": "source",
}

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> Samples:
    """Prometheus text exposition -> {metric: [(labels, value), ...]} (comments and bad lines skipped)."""
    out: Samples = defaultdict(list)
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None or line.startswith("#"):
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL.findall(match.group(2) or "")}
        out[match.group(1)].append((labels, value))
    return dict(out)


def _num(value: float) -> float:
    """Counters of whole things read back as whole numbers (the text format writes 4.0)."""
    value = float(value)
    return int(value) if value.is_integer() else value


def has_kvtier(samples: Samples) -> bool:
    return any(name.startswith("kvtier_") for name in samples)


def _by_tier(series: list[tuple[dict[str, str], float]]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for labels, value in series:
        out[labels.get("tier", "")] += value
    return {tier: _num(value) for tier, value in out.items()}


def kvtier_stats(samples: Samples) -> dict[str, Any]:
    """kvtier's counters as the engine driver's stats file has them; {} when the server shows none."""
    if not has_kvtier(samples):
        return {}
    counters: dict[str, float] = {}
    for metric, name in CONNECTOR.items():
        counters[name] = _num(sum(value for _, value in samples.get(metric, [])))
    for metric, name in PER_TIER_CONNECTOR.items():
        for tier, value in _by_tier(samples.get(metric, [])).items():
            counters[f"{name}.{tier}"] = value
    tiers: dict[str, dict[str, float]] = defaultdict(dict)
    for metric, name in TIER.items():
        for tier, value in _by_tier(samples.get(metric, [])).items():
            tiers[tier][name] = value
    usage: dict[str, dict[str, float]] = defaultdict(dict)
    for metric, name in USAGE.items():
        for tier, value in _by_tier(samples.get(metric, [])).items():
            usage[tier][name] = value
    return {"counters": counters, "tiers": dict(tiers), "usage": dict(usage)}


def vllm_counters(samples: Samples) -> dict[str, float]:
    """vLLM's own prefix-cache and token counters, summed over engines."""
    out: dict[str, float] = {}
    for metric, label in VLLM_COUNTERS.items():
        for labels, value in samples.get(metric, []):
            key = metric if label is None else f"{metric}{{{label}={labels.get(label, '')}}}"
            out[key] = out.get(key, 0.0) + value
    return out


def block_size(samples: Samples) -> int | None:
    """The server's KV block size, from the labels of ``vllm:cache_config_info``."""
    for labels, _ in samples.get("vllm:cache_config_info", []):
        if labels.get("block_size", "").isdigit():
            return int(labels["block_size"])
    return None


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0.0), 6) for k, v in after.items()}
