"""Summaries and tables of bench_attention.py's engine runs: hit rates per request group, mean and spread over
seeds, and how far repeated runs of one seed differ (reproducibility)."""

from __future__ import annotations

import statistics
from typing import Any

from kvtier_bench.families import BLOCK, Req

GROUPS = ("all", "follow-ups", "first follow-ups")


def summarize(name: str, reqs: list[Req], result: dict[str, Any], can_hit: list[int]) -> dict[str, Any]:
    """Hit rates and TTFT per request group of one engine run. ``ttft_rel`` divides by the run's median opening
    TTFT (openings miss in every policy alike), which cancels the load drift between runs on a shared machine."""
    rows = result["rows"]
    groups = {"all": range(len(reqs)), "follow-ups": [i for i, r in enumerate(reqs) if r.turn > 0],
              "first follow-ups": [i for i, r in enumerate(reqs) if r.turn == 1]}
    base = statistics.median(rows[i]["ttft_s"] for i, r in enumerate(reqs) if r.turn == 0)
    out: dict[str, Any] = {"policy": name, "wall_s": result["wall_s"], "capture": result["capture_log"],
                           "opening_ttft_p50_ms": round(1e3 * base, 1)}
    for group, idx in groups.items():
        idx = list(idx)
        cached = sum(rows[i]["cached"] for i in idx)
        ttft = [rows[i]["ttft_s"] for i in idx]
        out[group] = {"requests": len(idx), "hit_rate": cached / max(1, sum(can_hit[i] for i in idx)),
                      "ttft_mean_ms": 1e3 * statistics.mean(ttft), "ttft_rel": statistics.mean(ttft) / base}
    counters = result["stats"].get("tiers", {}).get("dram", {})
    out["dram"] = {k: counters.get(k, 0) for k in ("hits", "puts", "evictions", "drops")}
    out["attention"] = {k: v for k, v in result["stats"].get("counters", {}).items() if k.startswith("attention.")}
    out["cached"] = [row["cached"] for row in rows]
    out["rows"] = rows
    return out


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Over the runs of one policy: per group, the mean and sd over seeds of each seed's mean over repeats,
    and the largest difference between repeats of one seed (0.0: every repeat served the same tokens)."""
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for run in runs:
        by_seed.setdefault(run["seed"], []).append(run)
    out: dict[str, Any] = {"policy": runs[0]["policy"], "seeds": sorted(by_seed),
                           "repeats": max(len(v) for v in by_seed.values())}
    for group in GROUPS:
        per_seed = [statistics.mean(r[group]["hit_rate"] for r in reps) for reps in by_seed.values()]
        repeat_gap = max(max(r[group]["hit_rate"] for r in reps) - min(r[group]["hit_rate"] for r in reps)
                         for reps in by_seed.values())
        out[group] = {"hit_rate": statistics.mean(per_seed), "sd": _sd(per_seed), "repeat_gap": repeat_gap,
                      "ttft_rel": statistics.mean(r[group]["ttft_rel"] for r in runs)}
    out["identical_repeats"] = all(len({tuple(r["cached"]) for r in reps}) == 1 for reps in by_seed.values())
    out["evictions"] = statistics.mean(r["dram"]["evictions"] for r in runs)
    return out


def markdown(table: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    intro = (f"Per seed: {meta['requests']} requests ({meta['conversations']} conversations, {meta['engaged']} "
             f"engaged), {meta['rounds']} rounds; seeds {meta['seeds']}, {meta['repeats']} run(s) each; DRAM tier "
             f"{meta['dram_blocks']} blocks of {BLOCK} tokens; saves {meta['saves']}. Hit rate = tokens served by "
             "kvtier / tokens an unbounded cache could serve; mean ± sample sd over seeds. Repeat gap = the largest "
             "difference in follow-up hit rate between repeated runs of one seed; identical = every repeat served "
             "exactly the same tokens on every request. TTFT rel. = follow-up TTFT over the run's median opening "
             "TTFT (cancels the shared machine's load drift).")
    header = ("| policy | hit rate all | follow-ups | 1st follow-ups | repeat gap | identical repeats "
              "| TTFT follow-ups rel. | evictions |")
    lines = [f"# Attention-aware eviction vs LRU/LFU/ARC ({meta['model_name']}, real vLLM CPU runs)", "",
             intro, "", f"Command: `{meta['command']}`", "", header, "|---|---|---|---|---|---|---|---|"]
    for s in table:
        a, f, f1 = s["all"], s["follow-ups"], s["first follow-ups"]
        lines.append(f"| {s['policy']} | {a['hit_rate']:.3f} ± {a['sd']:.3f} | {f['hit_rate']:.3f} ± {f['sd']:.3f} "
                     f"| {f1['hit_rate']:.3f} ± {f1['sd']:.3f} | {f['repeat_gap']:.3f} | "
                     f"{'yes' if s['identical_repeats'] else 'no'} | {f['ttft_rel']:.2f} | {s['evictions']:.0f} |")
    return "\n".join(lines) + "\n"
