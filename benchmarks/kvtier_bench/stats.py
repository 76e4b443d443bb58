"""Metrics of one configuration's run, and the correctness check against the reference run.

Latencies are in milliseconds. Hits per tier: ``vllm`` is vLLM's own prefix cache (the request's
``num_cached_tokens`` minus what kvtier loaded), the others are the tokens kvtier loaded from each tier
(the worker's ``loaded_blocks.<tier>`` counters times the block size).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _ms(values: list[float], qs: tuple[int, ...]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for q in qs:
        value = percentile(values, q)
        out[f"p{q}"] = None if value is None else round(value * 1000, 2)
    out["mean"] = round(sum(values) / len(values) * 1000, 2) if values else None
    return out


def _counter_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    b, a = before.get("counters", {}), after.get("counters", {})
    return {k: v - b.get(k, 0) for k, v in a.items()}


def _tier_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, int]]:
    b, a = before.get("tiers", {}), after.get("tiers", {})
    return {tier: {k: v - b.get(tier, {}).get(k, 0) for k, v in counters.items()} for tier, counters in a.items()}


def _hit_tokens(rounds: list[dict[str, Any]], cached: int, block_size: int) -> dict[str, int]:
    tiers: dict[str, int] = defaultdict(int)
    for rnd in rounds:
        for key, value in _counter_delta(rnd.get("kvtier_before", {}), rnd.get("kvtier_after", {})).items():
            if key.startswith("loaded_blocks.") and value:
                tiers[key.split(".", 1)[1]] += int(value) * block_size
    return {"vllm": cached - sum(tiers.values()), **tiers}


def _queue(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Engine steps after which requests were still waiting to be admitted (driver.QueueWatch), all rounds."""
    watched: list[dict[str, int]] = [rnd["queue"] for rnd in rounds if rnd.get("queue")]
    if not watched or len(watched) < len(rounds):
        return None
    steps = sum(q["steps"] for q in watched)
    waiting = sum(q["waiting_steps"] for q in watched)
    return {"steps": steps, "waiting_steps": waiting, "waiting_share": round(waiting / steps, 4) if steps else 0.0,
            "max_waiting": max(q["max_waiting"] for q in watched)}


def _kvtier(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not rounds or not rounds[-1].get("kvtier_after"):
        return None
    total: dict[str, float] = defaultdict(float)
    tiers: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for rnd in rounds:
        for key, value in _counter_delta(rnd.get("kvtier_before", {}), rnd["kvtier_after"]).items():
            total[key] += value
        for tier, counters in _tier_delta(rnd.get("kvtier_before", {}), rnd["kvtier_after"]).items():
            for name, value in counters.items():
                tiers[tier][name] += value
    return {"loaded_bytes": int(total["loaded_bytes"]), "saved_bytes": int(total["saved_bytes"]),
            "load_failed_blocks": int(total["load_failed_blocks"]),
            "tiers": {t: dict(c) for t, c in tiers.items()}, "usage": rounds[-1]["kvtier_after"].get("usage", {})}


def summarize(raw: dict[str, Any], block_size: int) -> dict[str, Any]:
    """Metrics over all timed rounds of one configuration (requests pooled; per-tier counts summed)."""
    rounds = raw["rounds"]
    reqs = [r for rnd in rounds for r in rnd["requests"]]
    ttft = [r["token_s"][0] - r["arrival_s"] for r in reqs]
    itl = [b - a for r in reqs for a, b in zip(r["token_s"], r["token_s"][1:])]
    e2e = [r["finish_s"] - r["arrival_s"] for r in reqs]
    by_turn: dict[int, list[float]] = defaultdict(list)
    hits_by_turn: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for r in reqs:
        by_turn[r["turn"]].append(r["token_s"][0] - r["arrival_s"])
        hits_by_turn[r["turn"]][0] += r["num_cached_tokens"]
        hits_by_turn[r["turn"]][1] += r["prompt_len"]
    wall = max(sum(rnd["wall_s"] for rnd in rounds), 1e-9)
    out_tokens = sum(len(r["output"]) for r in reqs)
    prompt_tokens = sum(r["prompt_len"] for r in reqs)
    cached = sum(r["num_cached_tokens"] for r in reqs)
    return {
        "rounds": len(rounds),
        "requests": len(reqs),
        "ttft_ms": _ms(ttft, (50, 90, 99)),
        "ttft_p50_by_round_ms": [_ms([r["token_s"][0] - r["arrival_s"] for r in rnd["requests"]], (50,))["p50"]
                                 for rnd in rounds],
        "ttft_by_turn_ms": {str(t): {**_ms(v, (50, 90, 99)), "n": len(v)} for t, v in sorted(by_turn.items())},
        "itl_ms": _ms(itl, (50, 99)),
        "e2e_ms": _ms(e2e, (50, 99)),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(reqs) / wall, 3),
        "output_tokens_per_s": round(out_tokens / wall, 1),
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached,
        "hit_rate": round(cached / prompt_tokens, 4) if prompt_tokens else 0.0,
        "hit_rate_by_turn": {str(t): round(h / p, 4) if p else 0.0 for t, (h, p) in sorted(hits_by_turn.items())},
        "hit_tokens_by_tier": _hit_tokens(rounds, cached, block_size),
        "kvtier": _kvtier(rounds),
        "queue": _queue(rounds),
        "peak_rss_bytes": raw["peak_rss_bytes"],
        "startup_s": raw["startup_s"],
        "import_s": raw.get("import_s"),
        "loadavg": [round(sum(rnd["loadavg_before"][0] for rnd in rounds) / len(rounds), 2),
                    round(sum(rnd["loadavg_after"][0] for rnd in rounds) / len(rounds), 2)],
    }


def check_against(reference: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """Compare greedy outputs with the reference run (vLLM prefix cache that never evicts).

    The verdict uses the correctness pass (``check_requests``: every cache emptied, then one request at a
    time, in the same order everywhere). A request is *strict* while this configuration has reused exactly as
    many tokens as the reference for it and for every request before it: the arithmetic is then the same, so
    only wrong KV could change a token. Once the split differs (it recomputed what the reference reused), the
    numbers differ in the last bits (a prefix hit and a recompute are not bit-exact even in plain vLLM;
    random-weight models have near-tied logits): those requests are counted as *other split*, informational.
    A conversation whose answer differed has different prompts afterwards and is not compared further.
    ``passed``: every strict request is identical. The timed run is compared too, for information only
    (there, batch composition depends on timing).
    """
    ref = {(r["conv"], r["turn"]): r for r in reference["check_requests"]}
    on_path = True
    diverged: set[int] = set()
    counts = dict.fromkeys(("strict", "strict_identical", "strict_with_hits", "different_split",
                            "different_split_identical", "not_comparable"), 0)
    mismatches: list[dict[str, Any]] = []
    for r in raw["check_requests"]:
        other = ref.get((r["conv"], r["turn"]))
        if other is None or r["conv"] in diverged:
            counts["not_comparable"] += 1
            continue
        on_path = on_path and r["num_cached_tokens"] == other["num_cached_tokens"]
        same = r["output"] == other["output"]
        kind = "strict" if on_path else "different_split"
        counts[kind] += 1
        counts[f"{kind}_identical"] += same
        counts["strict_with_hits"] += on_path and r["num_cached_tokens"] > 0
        if not same:
            diverged.add(r["conv"])
            first = next((i for i, (a, b) in enumerate(zip(r["output"], other["output"])) if a != b),
                         min(len(r["output"]), len(other["output"])))
            mismatches.append({"conv": r["conv"], "turn": r["turn"], "strict": on_path, "first_diff_token": first,
                               "cached": r["num_cached_tokens"], "reference_cached": other["num_cached_tokens"]})
            on_path = False
    loaded = _counter_delta(raw["rounds"][-1].get("kvtier_after", {}), raw.get("kvtier_final", {}))
    return {**counts, "mismatches": mismatches, "passed": counts["strict_identical"] == counts["strict"],
            "kvtier_loaded_blocks": int(loaded.get("loaded_blocks", 0)),
            "timed_run": _timed_match(reference["rounds"], raw["rounds"])}


def _timed_match(reference: list[dict[str, Any]], mine: list[dict[str, Any]]) -> dict[str, int]:
    """Timed rounds, round i against the reference's round i: requests with the same prompt as the
    reference's (earlier answers matched), and how many of those gave the same answer."""
    compared = identical = 0
    for ref_round, my_round in zip(reference, mine):
        ref = {(r["conv"], r["turn"]): r["output"] for r in ref_round["requests"]}
        diverged: set[int] = set()
        for r in sorted(my_round["requests"], key=lambda r: (r["conv"], r["turn"])):
            if r["conv"] in diverged or (r["conv"], r["turn"]) not in ref:
                continue
            compared += 1
            if r["output"] == ref[(r["conv"], r["turn"])]:
                identical += 1
            else:
                diverged.add(r["conv"])
    return {"compared": compared, "identical": identical}
