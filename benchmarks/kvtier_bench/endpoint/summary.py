"""Metrics of an endpoint run: kvtier_bench.stats.summarize over the timed rounds, plus per-round median and
spread, and the cache-hit counts from the server's counters where the responses did not carry them."""

from __future__ import annotations

import statistics
from typing import Any

from kvtier_bench.stats import summarize

# Per-round values shown as median and spread: name -> (summary key, sub-key or None).
ROUND_METRICS: dict[str, tuple[str, str | None]] = {
    "ttft_p50_ms": ("ttft_ms", "p50"), "ttft_p90_ms": ("ttft_ms", "p90"), "ttft_p99_ms": ("ttft_ms", "p99"),
    "itl_p50_ms": ("itl_ms", "p50"), "itl_p99_ms": ("itl_ms", "p99"), "e2e_p50_ms": ("e2e_ms", "p50"),
    "requests_per_s": ("requests_per_s", None), "output_tokens_per_s": ("output_tokens_per_s", None),
    "hit_rate": ("hit_rate", None),
}
CACHED_PER_REQUEST = "per request (usage.prompt_tokens_details.cached_tokens)"
CACHED_FROM_COUNTERS = "server counter vllm:prompt_tokens_cached_total (per-request counts not sent)"
NOT_REPORTED = "not reported by the server"


def _raw(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {"rounds": rounds, "peak_rss_bytes": None, "startup_s": None, "import_s": None}


def _pick(summary: dict[str, Any], key: str, sub: str | None) -> float | None:
    value = summary[key] if sub is None else summary[key][sub]
    return None if value is None else float(value)


def per_round(rounds: list[dict[str, Any]], block_size: int) -> dict[str, Any]:
    """Each ROUND_METRICS value per round, with its median and [min, max] over the rounds."""
    singles = [summarize(_raw([rnd]), block_size) for rnd in rounds]
    by_round = {name: [_pick(s, key, sub) for s in singles] for name, (key, sub) in ROUND_METRICS.items()}
    median: dict[str, float | None] = {}
    spread: dict[str, list[float] | None] = {}
    for name, values in by_round.items():
        known = [v for v in values if v is not None]
        median[name] = round(statistics.median(known), 3) if known else None
        spread[name] = [round(min(known), 3), round(max(known), 3)] if known else None
    return {"by_round": by_round, "median": median, "spread": spread}


def _server_delta(rounds: list[dict[str, Any]], name: str) -> float | None:
    values = [rnd.get("server_counters", {}).get(name) for rnd in rounds]
    return None if any(v is None for v in values) else sum(values)


def _server_totals(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """vLLM's counters summed over the rounds (each round's delta)."""
    total: dict[str, float] = {}
    for rnd in rounds:
        for name, value in rnd.get("server_counters", {}).items():
            total[name] = round(total.get(name, 0.0) + value, 6)
    return total


def _cached_from_counters(summary: dict[str, Any], rounds: list[dict[str, Any]]) -> str:
    """Without per-request counts, the cached total (and so vLLM's share) comes from the server's counter."""
    cached = _server_delta(rounds, "vllm:prompt_tokens_cached_total")
    summary["hit_rate_by_turn"] = {}
    if cached is None:
        summary["cached_tokens"] = None
        summary["hit_rate"] = None
        summary["hit_tokens_by_tier"] = {k: v for k, v in summary["hit_tokens_by_tier"].items() if k != "vllm"}
        return NOT_REPORTED
    kvtier = sum(v for k, v in summary["hit_tokens_by_tier"].items() if k != "vllm")
    summary["cached_tokens"] = int(cached)
    summary["hit_rate"] = round(cached / summary["prompt_tokens"], 4) if summary["prompt_tokens"] else 0.0
    summary["hit_tokens_by_tier"]["vllm"] = int(cached) - kvtier
    return CACHED_FROM_COUNTERS


def summarize_endpoint(rounds: list[dict[str, Any]], block_size: int) -> dict[str, Any]:
    """Pooled metrics over all rounds (as the engine mode reports them) and their per-round spread.

    ``hit_tokens_by_tier``: ``vllm`` = the server's own prefix cache (cached prompt tokens minus what kvtier
    loaded), the others = tokens kvtier loaded from each tier (``kvtier_tier_loaded_blocks_total`` deltas
    times the server's block size). Without kvtier's counters on the server's /metrics, another connector's
    hits (``vllm:external_prefix_cache_hits_total``) show as ``connector``.
    """
    summary = summarize(_raw(rounds), block_size)
    requests = [r for rnd in rounds for r in rnd["requests"]]
    if requests and all(r["cached_reported"] for r in requests):
        summary["cached_tokens_source"] = CACHED_PER_REQUEST
    else:
        summary["cached_tokens_source"] = _cached_from_counters(summary, rounds)
    summary["kvtier_source"] = ("server /metrics (kvtier_* counters)" if any(r.get("kvtier_after") for r in rounds)
                                else NOT_REPORTED)
    summary["server_counters"] = _server_totals(rounds)
    external = summary["server_counters"].get("vllm:external_prefix_cache_hits_total")
    if summary["kvtier_source"] == NOT_REPORTED and external and "vllm" in summary["hit_tokens_by_tier"]:
        # Another connector (e.g. vLLM's OffloadingConnector on a GPU) served these: vLLM counts them apart.
        summary["hit_tokens_by_tier"] = {"vllm": summary["hit_tokens_by_tier"]["vllm"] - int(external),
                                         "connector": int(external)}
    summary["failed_requests"] = sum(len(rnd["failures"]) for rnd in rounds)
    summary.update(per_round(rounds, block_size))
    return summary
