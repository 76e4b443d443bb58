"""results.md of an endpoint run: the engine mode's tables (one row, the server) with the server's details."""

from __future__ import annotations

from typing import Any

from kvtier_bench.endpoint.summary import NOT_REPORTED, ROUND_METRICS


def _f(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value / 2**20:.1f}"


def _cell(m: dict[str, Any], name: str, digits: int = 0) -> str:
    """Pooled value; with >= 3 rounds, the median over rounds and [min–max]."""
    if m["rounds"] >= 3 and m["median"][name] is not None:
        low, high = m["spread"][name]
        return f"{_f(m['median'][name], digits)} [{_f(low, digits)}–{_f(high, digits)}]"
    key, sub = ROUND_METRICS[name]
    value = m[key] if sub is None else m[key][sub]
    return _f(value, digits)


def _hits(m: dict[str, Any]) -> str:
    parts = [f"{tier} {tokens}" for tier, tokens in m["hit_tokens_by_tier"].items() if tokens or tier == "vllm"]
    if m["kvtier_source"] == NOT_REPORTED:
        parts.append("kvtier: not reported by the server")
    return " / ".join(parts) or NOT_REPORTED


def _header(report: dict[str, Any]) -> list[str]:
    s, e = report["settings"], report["endpoint"]
    w = s["workload"]
    m = report["results"][0].get("summary") or {}
    return [
        f"# kvtier multi-turn chat benchmark against a server: preset `{s['preset']}`",
        "",
        f"Command: `{report['command']}`  ",
        (f"Server: {e['url']} (vLLM {e['server_version'] or 'version unknown'}), model `{e['model']}`, "
         f"max_model_len {e['max_model_len'] or 'unknown'}, KV block size {e['block_size']} ({e['block_size_source']}).  "),
        (f"Workload: {w['conversations']} conversations x {w['turns']} turns ({report['workload']['requests']} "
         f"requests), system prompt {w['system_tokens']} tokens (shared), document {w['document_tokens']}, question "
         f"{w['question_tokens']}, answer {w['answer_tokens']} tokens; arrivals {w['arrival_rate']}/s (Poisson), "
         f"think time {w['think_time_s']} s; seed {w['seed']}; {s['rounds']} timed round(s); before each round: "
         f"{e['reset']}.  "),
        (f"Prompts built with {e['tokenizer']}; answers fed back as the token ids the server streamed "
         f"(`return_token_ids`); cached tokens: {m.get('cached_tokens_source', '–')}; kvtier's hits: "
         f"{m.get('kvtier_source', '–')}.  "),
        f"Client machine: {report['machine']}; kvtier at {report.get('git', 'unknown')}.",
        "",
    ]


def _main_table(row: dict[str, Any]) -> list[str]:
    m = row["summary"]
    kv = m["kvtier"] or {}
    moved = f"{_mib(kv.get('loaded_bytes'))} / {_mib(kv.get('saved_bytes'))}" if kv else "–"
    rate = "–" if m["hit_rate"] is None else f"{m['hit_rate']:.0%}"
    spread = " (median [min–max] over rounds)" if m["rounds"] >= 3 else ""
    return [
        (f"| endpoint | TTFT p50 / p90 / p99 ms{spread} | ITL p50 / p99 ms | e2e p50 ms | req/s | out tok/s | hit rate "
         "| hit tokens by source | kvtier loaded / saved MiB | failed requests | load avg (client) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
        (f"| {row['name']} | {_cell(m, 'ttft_p50_ms')} / {_cell(m, 'ttft_p90_ms')} / {_cell(m, 'ttft_p99_ms')} "
         f"| {_cell(m, 'itl_p50_ms', 1)} / {_cell(m, 'itl_p99_ms', 1)} | {_cell(m, 'e2e_p50_ms')} "
         f"| {_cell(m, 'requests_per_s', 2)} | {_cell(m, 'output_tokens_per_s', 1)} | {rate} | {_hits(m)} | {moved} "
         f"| {m['failed_requests']} | {_f(m['loadavg'][0], 1)}–{_f(m['loadavg'][1], 1)} |"),
    ]


def _server_line(m: dict[str, Any]) -> list[str]:
    """What the server itself counted (a cross-check of the hits above, and the sources vLLM names)."""
    counters = m.get("server_counters") or {}
    if not counters:
        return ["The server's own counters: not reported by the server (no /metrics).", ""]
    local = counters.get("vllm:prefix_cache_hits_total")
    external = counters.get("vllm:external_prefix_cache_hits_total")
    sources = ", ".join(f"{k.split('source=')[1].rstrip('}')} {v:.0f}" for k, v in counters.items()
                        if k.startswith("vllm:prompt_tokens_cached_by_source_total") and v)
    return [f"The server's own counters over the rounds: prefix-cache hits {_f(local)} tokens local, {_f(external)} "
            f"from its KV connector; cached tokens by source: {sources or 'none'}.", ""]


def _turn_table(row: dict[str, Any]) -> list[str]:
    by = row["summary"]["ttft_by_turn_ms"]
    turns = sorted(by, key=int)
    per_round = ", ".join(_f(v) for v in row["summary"]["ttft_p50_by_round_ms"])
    return ["TTFT p50 by turn (ms):", "",
            "| endpoint | " + " | ".join(f"turn {t}" for t in turns) + " | all turns, per round |",
            "|---|" + "---|" * (len(turns) + 1),
            f"| {row['name']} | " + " | ".join(_f(by[t]["p50"]) for t in turns) + f" | {per_round} |"]


def _round_table(row: dict[str, Any]) -> list[str]:
    m = row["summary"]
    lines = [f"Per round ({m['rounds']} rounds; median and [min–max] shown above from 3 rounds on):", "",
             "| metric | " + " | ".join(f"round {i + 1}" for i in range(m["rounds"])) + " | median | min–max |",
             "|---|" + "---|" * (m["rounds"] + 2)]
    for name, values in m["by_round"].items():
        spread = m["spread"][name]
        lines.append(f"| {name} | " + " | ".join(_f(v, 2) for v in values)
                     + f" | {_f(m['median'][name], 2)} | {'–' if spread is None else f'{spread[0]:.2f}–{spread[1]:.2f}'} |")
    return lines


def _legend() -> str:
    return (
        "TTFT is measured by this client from each request's scheduled arrival (so it includes the network and "
        "the server's queueing), ITL between consecutive streamed chunks of one request (tokens that arrive in "
        "one chunk share its time), e2e from arrival to the last token; req/s and tokens/s over the rounds' "
        "wall time. Hit tokens: `vllm` = the server's own prefix cache (cached prompt tokens minus what kvtier "
        "loaded), the others = tokens kvtier loaded from that tier, read from the server's /metrics before and "
        "after each round (`kvtier_tier_loaded_blocks_total` times the block size).\n\n"
        "No correctness check: the endpoint mode has no reference run to compare with. The generated token ids "
        "are kept in results.json (`results[0].rounds[].requests[].output`).\n\n"
        "Load average: the client machine's 1-minute load, before–after each round (mean over rounds); the "
        "server's load is not seen from here.")


def markdown(report: dict[str, Any]) -> str:
    row = report["results"][0]
    lines = _header(report)
    if row["status"] != "ok" and "summary" not in row:
        lines.append(f"- **{row['name']}**: {row['status']}: {row['error']}")
        return "\n".join(lines) + "\n"
    lines += _main_table(row) + [""] + _server_line(row["summary"]) + _turn_table(row) + [""]
    if row["summary"]["rounds"] >= 2:
        lines += _round_table(row) + [""]
    if row.get("error"):
        lines += [f"- **{row['name']}**: {row['status']}: {row['error']}", ""]
    lines.append(_legend())
    return "\n".join(lines) + "\n"
