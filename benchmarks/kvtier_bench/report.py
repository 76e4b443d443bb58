"""Report of a benchmark run: markdown tables and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvtier_bench.compare import markdown as compare_markdown
from kvtier_bench.compare import spread, spread_rate, users_rate, wall_rate
from kvtier_bench.procs import ALLOCATORS

TIER_COLORS = {"vllm": "#4c72b0", "dram": "#55a868", "disk": "#dd8452", "s3": "#8172b3", "recomputed": "#cccccc"}


def _f(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value / 2**20:.1f}"


def _hits(summary: dict[str, Any]) -> str:
    hits = summary["hit_tokens_by_tier"]
    return " / ".join(f"{tier} {tokens}" for tier, tokens in hits.items() if tokens or tier == "vllm")


def _check(name: str, check: dict[str, Any] | None) -> str:
    if check is None:
        return "(reference)" if name == "reference" else "not checked: no reference run"
    verdict = "OK" if check["passed"] else "FAIL"
    timed = check["timed_run"]
    return (f"{verdict}: strict {check['strict_identical']}/{check['strict']} ({check['strict_with_hits']} with hits, "
            f"{check['kvtier_loaded_blocks']} blocks from kvtier), "
            f"other split {check['different_split_identical']}/{check['different_split']}; "
            f"timed run {timed['identical']}/{timed['compared']}")


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    w = s["workload"]
    lines = [
        f"# kvtier multi-turn chat benchmark: preset `{s['preset']}`",
        "",
        f"Command: `{report['command']}`  ",
        (f"Model: `{report.get('model', s['model'])}`; {w['conversations']} conversations x {w['turns']} turns "
         f"({report['workload']['requests']} requests), system prompt {w['system_tokens']} tokens (shared), "
         f"document {w['document_tokens']}, question {w['question_tokens']}, answer {w['answer_tokens']} tokens; "
         f"arrivals {w['arrival_rate']}/s (Poisson), think time {w['think_time_s']} s; seed {w['seed']}; "
         f"{s['rounds']} timed round(s) per configuration, round-robin across configurations.  "),
        (f"{_kv_spaces(report)}, block size {s['engine']['block_size']}; "
         f"machine: {report['machine']}; allocator of every engine: "
         f"{ALLOCATORS[s.get('allocator', 'default')]}; kvtier at {report.get('git', 'unknown')}.  "),
        _working_set(report),
        "",
        ("| config | TTFT p50 ms per round: median (min–max) | TTFT p50 / p90 / p99 ms (all rounds) "
         "| ITL p50 / p99 ms | e2e p50 ms | users' req/s per round | wall req/s per round | out tok/s | hit rate "
         "| hit tokens by tier | loaded / saved MiB | peak RSS MiB | outputs vs reference | load avg |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if r["status"] != "ok":
            continue
        m = r["summary"]
        kv = m["kvtier"] or {}
        moved = f"{_mib(kv.get('loaded_bytes'))} / {_mib(kv.get('saved_bytes'))}" if kv else "–"
        t, i = m["ttft_ms"], m["itl_ms"]
        walls = [wall_rate(rnd) for rnd in r["rounds"] if rnd["wall_s"] > 0]
        users = [users_rate(rnd) for rnd in r["rounds"]]
        lines.append(
            f"| {r['name']} | {spread(m['ttft_p50_by_round_ms'])} "
            f"| {_f(t['p50'])} / {_f(t['p90'])} / {_f(t['p99'])} | {_f(i['p50'], 1)} / {_f(i['p99'], 1)} "
            f"| {_f(m['e2e_ms']['p50'])} | {spread_rate(users)} | {spread_rate(walls)} "
            f"| {m['output_tokens_per_s']:.1f} "
            f"| {m['hit_rate']:.0%} | {_hits(m)} | {moved} | {_mib(m['peak_rss_bytes'])} | {_check(r['name'], r.get('check'))} "
            f"| {_f(m['loadavg'][0], 1)}–{_f(m['loadavg'][1], 1)} |")
    lines += ["", "TTFT p50 by turn (ms):", ""]
    turns = sorted({t for r in report["results"] if r["status"] == "ok" for t in r["summary"]["ttft_by_turn_ms"]},
                   key=int)
    lines.append("| config | " + " | ".join(f"turn {t}" for t in turns)
                 + " | all turns, per round | steps leaving requests queued (most queued) |")
    lines.append("|---|" + "---|" * (len(turns) + 2))
    for r in report["results"]:
        if r["status"] == "ok":
            by = r["summary"]["ttft_by_turn_ms"]
            per_round = ", ".join(_f(v) for v in r["summary"]["ttft_p50_by_round_ms"])
            lines.append(f"| {r['name']} | " + " | ".join(_f(by.get(t, {}).get("p50")) for t in turns)
                         + f" | {per_round} | {_queued(r['summary'].get('queue'))} |")
    lines += compare_markdown(report.get("comparisons", []))
    others = [r for r in report["results"] if r["status"] != "ok"]
    if others:
        lines += [""] + [f"- **{r['name']}**: {r['status']}: {r['error']}" for r in others]
    lines += ["", _legend()]
    return "\n".join(lines) + "\n"


def _queued(queue: dict[str, Any] | None) -> str:
    if not queue:
        return "–"
    return f"{queue['waiting_share']:.1%} of {queue['steps']:,} ({queue['max_waiting']})"


def _kv_spaces(report: dict[str, Any]) -> str:
    """vLLM's KV spaces as the engines ran them; where they were scaled to this machine, the settings' too."""
    small, ref = report["settings"]["engine"]["kv_cache_bytes"], report["settings"]["engine"]["reference_kv_cache_bytes"]
    ran = report.get("kv_cache_bytes") or {}
    run_ref = ran.get("reference", ref)
    run_small = next((b for name, b in ran.items() if name != "reference"), small)
    text = f"vLLM KV space {_mib(run_small)} MiB (reference: {_mib(run_ref)} MiB"
    if (run_small, run_ref) != (small, ref):
        text += f"; the settings' {_mib(small)} / {_mib(ref)} MiB, scaled to this machine"
    return text + ")"


def _working_set(report: dict[str, Any]) -> str:
    w = report["workload"]
    if not w.get("working_set_tokens") or not w.get("kv_space_tokens"):
        return ""
    return (f"Working set: {w['working_set_tokens']:,} distinct tokens of history (the shared prompt once), "
            f"{w['working_set_tokens'] / w['kv_space_tokens']:.1f}x vLLM's KV space ({w['kv_space_tokens']:,} "
            f"tokens of {w['kv_bytes_per_token']:,} bytes).")


def _legend() -> str:
    return (
        "TTFT is measured from each request's scheduled arrival (so it includes queueing), ITL between "
        "consecutive tokens of one request, both from the engine's step loop. Hit tokens: `vllm` = vLLM's own "
        "prefix cache, the others = tokens kvtier loaded from that tier. *Steps leaving requests queued*: "
        "engine steps after which requests were still waiting to be admitted (vLLM's KV space or batch was "
        "full); a small KV space queues requests in bursts, which the reference's never-evicting one does not, "
        "and that waiting is part of the TTFT.\n\n"
        "*Outputs vs reference*: after the timed run each engine empties its caches (vLLM's and kvtier's) and "
        "replays the conversations one request at a time, in the same order everywhere; greedy outputs are "
        "compared with the `reference` (vLLM prefix cache large enough to never evict). *strict* = requests "
        "for which this configuration had, so far, reused exactly as many tokens as the reference (same "
        "arithmetic: only wrong KV could change a token): all must be identical. *other split* = it recomputed "
        "tokens the reference reused: a recompute and a prefix hit are not bit-exact even in plain vLLM "
        "(random-weight model, near-tied logits), so these are informational. *timed run* = the concurrent "
        "run's answers vs the reference's (informational: batch composition depends on timing, and a token "
        "computed beside other requests can differ in the last bit). A conversation is not compared after its "
        "first different answer (its prompts differ from then on).\n\n"
        "Load average: 1-minute, before–after the workload; other jobs share this machine and timings move "
        "with it.")


def plots(report: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if r["status"] == "ok"]
    files = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in ok:
        by = r["summary"]["ttft_by_turn_ms"]
        turns = sorted(by, key=int)
        ax.plot([int(t) for t in turns], [by[t]["p50"] for t in turns], marker="o", label=r["name"])
    turns_all = sorted({int(t) for r in ok for t in r["summary"]["ttft_by_turn_ms"]})
    ax.set_xticks(turns_all)
    ax.set_yscale("log")
    ax.set_xlabel("turn (0 = first question of a conversation)")
    ax.set_ylabel("TTFT p50 (ms, log scale)")
    ax.set_title("Time to first token by turn")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "ttft_by_turn.png", dpi=110)
    plt.close(fig)
    files.append("ttft_by_turn.png")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [r["name"] for r in ok]
    bottoms = [0.0] * len(ok)
    seen = {t for r in ok for t in r["summary"]["hit_tokens_by_tier"]}
    sources = [t for t in TIER_COLORS if t in seen] + sorted(seen - set(TIER_COLORS))
    for source in [*sources, "recomputed"]:
        values = []
        for r in ok:
            m = r["summary"]
            values.append(m["prompt_tokens"] - m["cached_tokens"] if source == "recomputed"
                          else m["hit_tokens_by_tier"].get(source, 0))
        ax.bar(names, values, bottom=bottoms, label=source, color=TIER_COLORS.get(source))
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_ylabel("prompt tokens")
    ax.set_title("Where prompt tokens came from (hits per tier)")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=25, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "hits_by_tier.png", dpi=110)
    plt.close(fig)
    files.append("hits_by_tier.png")
    return files
