"""Comparisons between configurations of one run: ratios with bootstrap intervals, and the targets.

Requests are paired across configurations by (round, conversation, turn): every configuration replays the same
conversations with the same arrival and think times. A TTFT ratio is the ratio of the two configurations'
median TTFT; its 95% interval comes from a paired bootstrap (resample the request pairs with replacement,
recompute the ratio of medians, 2,000 times, take the 2.5th and 97.5th percentiles). Throughput ratios are the
median of the per-round ratios, with their range.

Two throughputs: requests per second of a round's wall time, and the users' request rate (each conversation's
turns over the time from its first arrival to its last answer, summed over conversations). With think times the
wall time is mostly the arrivals' spread and the longest chain of pauses, the same for every configuration, so
it moves little even when a configuration answers 5x slower; the users' rate is what a fixed population of
users gets done per second (N / (answer time + think time) in steady state), and the throughput target uses it.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from typing import Any

DRAWS = 2000
# Issue #12's targets for the default preset: (what, comparison, threshold).
TARGETS = (
    ("TTFT p50 vs vllm-prefix", "vllm-prefix", "ttft", "<=", 1 / 3),
    ("TTFT p50 vs reference", "reference", "ttft", "<=", 1.25),
    ("users' request rate vs vllm-prefix", "vllm-prefix", "users_rate", ">=", 1.5),
)
KVTIER_SHARE_TARGET = 0.60


def _ttfts(raw: dict[str, Any]) -> dict[tuple[int, int, int], float]:
    return {(i, r["conv"], r["turn"]): r["token_s"][0] - r["arrival_s"]
            for i, rnd in enumerate(raw["rounds"]) for r in rnd["requests"]}


def ttft_ratio(mine: dict[str, Any], other: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Median TTFT of ``mine`` over ``other``'s, on the requests both ran, with a paired bootstrap 95% CI."""
    a, b = _ttfts(mine), _ttfts(other)
    keys = sorted(set(a) & set(b))
    if not keys:
        return {}
    ratio = statistics.median(a[k] for k in keys) / statistics.median(b[k] for k in keys)
    rng = random.Random(seed)
    draws = []
    for _ in range(DRAWS):
        sample = [keys[rng.randrange(len(keys))] for _ in keys]
        draws.append(statistics.median(a[k] for k in sample) / statistics.median(b[k] for k in sample))
    draws.sort()
    return {"ratio": round(ratio, 4), "ci95": [round(draws[int(0.025 * DRAWS)], 4), round(draws[int(0.975 * DRAWS)], 4)],
            "pairs": len(keys)}


def wall_rate(rnd: dict[str, Any]) -> float:
    """Requests per second of the round's wall time."""
    return len(rnd["requests"]) / rnd["wall_s"] if rnd["wall_s"] > 0 else 0.0


def users_rate(rnd: dict[str, Any]) -> float:
    """The users' request rate: per conversation, its turns over the time from its first arrival to its last
    answer, summed over conversations."""
    spans: dict[int, list[float]] = {}
    for r in rnd["requests"]:
        span = spans.setdefault(r["conv"], [r["arrival_s"], r["finish_s"], 0])
        span[0], span[1], span[2] = min(span[0], r["arrival_s"]), max(span[1], r["finish_s"]), span[2] + 1
    return sum(n / (end - start) for start, end, n in spans.values() if end > start)


def throughput_ratio(mine: dict[str, Any], other: dict[str, Any], rate: Callable[[dict[str, Any]], float] = wall_rate
                     ) -> dict[str, Any]:
    """``rate`` of ``mine`` over ``other``'s, round by round: the median and the range of the ratios."""
    ratios = [rate(x) / rate(y) for x, y in zip(mine["rounds"], other["rounds"]) if rate(x) > 0 and rate(y) > 0]
    if not ratios:
        return {}
    return {"ratio": round(statistics.median(ratios), 4), "range": [round(min(ratios), 4), round(max(ratios), 4)],
            "rounds": len(ratios)}


def kvtier_share(summary: dict[str, Any]) -> float | None:
    """The fraction of all reused tokens that kvtier's tiers served (the rest came from vLLM's own cache)."""
    hits = summary["hit_tokens_by_tier"]
    total = sum(hits.values())
    return round(1 - hits.get("vllm", 0) / total, 4) if total else None


def compare(results: list[dict[str, Any]], raws: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """For every kvtier configuration: its ratios against vllm-prefix and the reference, and the targets."""
    out = []
    for row in results:
        if row["status"] != "ok" or not row["name"].startswith("kvtier"):
            continue
        mine = raws[row["name"]]
        entry: dict[str, Any] = {"name": row["name"], "kvtier_share": kvtier_share(row["summary"]), "ratios": {},
                                 "targets": []}
        for base in ("vllm-prefix", "reference"):
            if base in raws:
                entry["ratios"][base] = {"ttft": ttft_ratio(mine, raws[base]),
                                         "throughput": throughput_ratio(mine, raws[base]),
                                         "users_rate": throughput_ratio(mine, raws[base], users_rate)}
        for label, base, metric, op, threshold in TARGETS:
            value = entry["ratios"].get(base, {}).get(metric, {}).get("ratio")
            if value is not None:
                met = value <= threshold if op == "<=" else value >= threshold
                entry["targets"].append({"target": label, "value": value, "op": op, "threshold": round(threshold, 4),
                                         "met": met})
        share = entry["kvtier_share"]
        if share is not None:
            entry["targets"].append({"target": "share of reused tokens from kvtier", "value": share, "op": ">=",
                                     "threshold": KVTIER_SHARE_TARGET, "met": share >= KVTIER_SHARE_TARGET})
        out.append(entry)
    return out


def spread(values: list[float | None]) -> str:
    """'median (min–max)' of per-round values."""
    present = [v for v in values if v is not None]
    if not present:
        return "–"
    return f"{statistics.median(present):.0f} ({min(present):.0f}–{max(present):.0f})"


def spread_rate(values: list[float]) -> str:
    """'median (min–max)' of per-round rates, two decimals."""
    if not values:
        return "–"
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def markdown(comparisons: list[dict[str, Any]]) -> list[str]:
    if not comparisons:
        return []
    lines = ["", "kvtier against the baselines (ratios < 1 mean kvtier is faster; TTFT: ratio of median TTFTs "
             "with a paired-bootstrap 95% interval; throughputs: median of per-round ratios, range):", "",
             "| config | TTFT vs vllm-prefix | TTFT vs reference | users' req/s vs vllm-prefix | users' req/s vs "
             "reference | wall req/s vs vllm-prefix | wall req/s vs reference | reused tokens from kvtier |",
             "|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        cells = []
        for base in ("vllm-prefix", "reference"):
            t = c["ratios"].get(base, {}).get("ttft") or {}
            cells.append(f"{t['ratio']:.3f} [{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}]" if t else "–")
        for metric in ("users_rate", "throughput"):
            for base in ("vllm-prefix", "reference"):
                t = c["ratios"].get(base, {}).get(metric) or {}
                cells.append(f"{t['ratio']:.2f} ({t['range'][0]:.2f}–{t['range'][1]:.2f})" if t else "–")
        share = c["kvtier_share"]
        lines.append(f"| {c['name']} | " + " | ".join(cells) + f" | {'–' if share is None else f'{share:.0%}'} |")
    lines += ["", "Targets (issue 12, default preset):", ""]
    for c in comparisons:
        met = ", ".join(f"{t['target']} {t['value']:.3g} {t['op']} {t['threshold']:.3g}: "
                        f"{'met' if t['met'] else 'NOT met'}" for t in c["targets"])
        lines.append(f"- {c['name']}: {met}")
    return lines
