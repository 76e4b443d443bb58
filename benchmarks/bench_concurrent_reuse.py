"""Reuse under concurrency: many long shared prefixes, requests kept in flight at a fixed concurrency, the
engine's KV space holding only a fraction of the prefixes. TTFT of kvtier served mostly from its disk tier (LZ4)
or from DRAM, against vLLM alone (same KV space: it recomputes what it evicted) and a reference vLLM whose KV
space holds every prefix (it never evicts: the best any offloader can do).

Each engine (one process per configuration, all started first, only the measured one running: the others are
SIGSTOPped) serves a warm-up pass, then ``--reps`` timed passes. A pass sends every prefix once, in an order
shuffled by the pass number (the same for every engine), each followed by a suffix no engine saw before, as a
closed loop: ``--concurrency`` requests in flight, the next one added when one finishes. Passes are interleaved
across the engines, the order rotating. Per pass: mean and median TTFT, the pass's wall time, and kvtier's
blocks loaded per tier. Ratios to the reference are paired by pass (geometric mean, 95% bootstrap interval).

Usage: python benchmarks/bench_concurrent_reuse.py [--size small] [--reps 5] [--out benchmarks/results/concurrent_reuse.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvtier_bench.procs import (
    ALLOCATORS,
    BLOCK,
    EngineProcess,
    add_allocator_arg,
    allocator_env,
    compute_dtype,
    cpu_list,
    fmt_ratio,
    geo_interval,
    kv_scale,
    prompt,
    run_interleaved,
    wait_for_startup_work,
)


# ---- worker process: one engine, one pass per command ----------------------------------------------------------
def _closed_loop(llm: Any, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict[str, Any]:
    """Serve ``prompts`` with at most ``concurrency`` in flight; seconds from each request's submission to its
    first token, in submission order, and the wall time of the whole pass."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    sent: dict[str, float] = {}
    first: dict[str, float] = {}
    in_flight = 0
    nxt = 0
    start = time.perf_counter()
    while nxt < len(prompts) or engine.has_unfinished_requests():
        while nxt < len(prompts) and in_flight < concurrency:
            rid = f"q{nxt}-{start}"
            sent[rid] = time.perf_counter()
            engine.add_request(rid, TokensPrompt(prompt_token_ids=prompts[nxt]), params)
            nxt += 1
            in_flight += 1
        for out in engine.step():
            now = time.perf_counter()
            if out.request_id not in first and out.outputs and out.outputs[0].token_ids:
                first[out.request_id] = now - sent[out.request_id]
            if out.finished:
                in_flight -= 1
    return {"ttft": [first[rid] for rid in sent], "wall": time.perf_counter() - start}


def _loaded_by_tier() -> dict[str, float]:
    from vllm.distributed.kv_transfer import (
        get_kv_transfer_group,
        has_kv_transfer_group,
    )

    if not has_kv_transfer_group():
        return {}
    snap = get_kv_transfer_group().snapshot() or {}
    counters = snap.get("counters", snap)
    return {k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("loaded_blocks.")}


def _pass(llm: Any, spec: dict[str, Any], prefixes: list[list[int]], rep: int) -> dict[str, Any]:
    order = list(range(len(prefixes)))
    random.Random(rep).shuffle(order)
    prompts = [prefixes[p] + prompt(100_000 + 1_000 * rep + p, spec["suffix_tokens"]) for p in order]
    before = _loaded_by_tier()
    out = _closed_loop(llm, prompts, spec["concurrency"], spec["max_tokens"])
    time.sleep(0.5)  # the pass's last saves land before the next pass (all engines alike)
    after = _loaded_by_tier()
    out["loaded_blocks"] = {tier: after[tier] - before.get(tier, 0) for tier in after}
    return out


def worker(spec: dict[str, Any]) -> None:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kwargs: dict[str, Any] = {}
    if spec.get("kvtier"):
        kwargs["kv_transfer_config"] = KVTransferConfig(kv_connector="KVTierConnector", kv_role="kv_both",
                                                        kv_connector_extra_config=spec["kvtier"])
    llm = LLM(model=spec["model"], dtype=compute_dtype(), max_model_len=spec["max_model_len"], enforce_eager=True,
              seed=0, block_size=BLOCK, kv_cache_memory_bytes=spec["kv_bytes"], **kwargs)
    wait_for_startup_work()
    prefixes = [prompt(1_000 + p, spec["prefix_tokens"]) for p in range(spec["prefixes"])]
    _pass(llm, spec, prefixes, -1)  # warm-up: every prefix computed once (kvtier stores them all)
    print("READY", flush=True)
    for line in sys.stdin:
        print("RESULT " + json.dumps(_pass(llm, spec, prefixes, int(line))), flush=True)


# ---- parent ------------------------------------------------------------------------------------------------
def summarise(raw: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    ref = raw["reference"]

    def paired(name: str, metric: Any) -> dict[str, Any]:
        return geo_interval([metric(r) / metric(b) for r, b in zip(raw[name], ref)])

    def mean(r: dict[str, Any]) -> float:
        return statistics.fmean(r["ttft"])

    def median(r: dict[str, Any]) -> float:
        return statistics.median(r["ttft"])

    table = {}
    for name, passes in raw.items():
        loaded: dict[str, float] = {}
        for p in passes:
            for tier, n in p["loaded_blocks"].items():
                loaded[tier] = loaded.get(tier, 0) + n
        table[name] = {
            "ttft_mean_ms": [round(mean(p) * 1000, 1) for p in passes],
            "ttft_p50_ms": [round(median(p) * 1000, 1) for p in passes],
            "wall_s": [round(p["wall"], 2) for p in passes],
            "loaded_blocks_per_pass": {t: round(n / len(passes), 1) for t, n in loaded.items()},
        }
        if name != "reference":
            table[name]["mean_vs_reference"] = paired(name, mean)
            table[name]["p50_vs_reference"] = paired(name, median)
            table[name]["wall_vs_reference"] = paired(name, lambda r: r["wall"])
    if "kvtier-disk" in raw and "kvtier-disk-always" in raw:  # what measured promotion buys, paired by pass
        table["kvtier-disk"]["mean_vs_always"] = geo_interval(
            [mean(g) / mean(a) for g, a in zip(raw["kvtier-disk"], raw["kvtier-disk-always"])])
    return table


def report(summary: dict[str, Any], args: argparse.Namespace, load: tuple[float, float],
           kv: dict[str, int]) -> str:
    lines = [(f"# Reuse under concurrency: model {args.size}, {args.prefixes} prefixes of {args.prefix_tokens} tokens "
             f"+ {args.suffix_tokens}-token suffixes, concurrency {args.concurrency}, {args.reps} interleaved passes"),
             "",
             (f"Command: `python benchmarks/bench_concurrent_reuse.py {' '.join(sys.argv[1:])}`; load average "
             f"{load[0]:.2f} before, {load[1]:.2f} after; OMP threads bound to cores {cpu_list()}; allocator of "
             f"every engine: {ALLOCATORS[args.allocator]}."),
             f"vLLM KV space: {kv['small'] >> 20} MiB (reference: {kv['reference'] >> 20} MiB, holds every prefix); "
             f"kvtier-disk: DRAM {args.disk_dram} in front of an LZ4 disk tier (disk hits promoted while that pays, "
             "measured); kvtier-disk-always: the same, every disk hit promoted; kvtier-dram: DRAM holds every prefix"
             + ("; kvtier-disk-async: kvtier-disk loading between steps (`connector.async_load`)."
                if "kvtier-disk-async" in summary else "."),
             "",
             ("| configuration | TTFT mean ms (median, range over passes) | TTFT p50 ms | pass wall s | "
             "blocks loaded per pass | mean TTFT / reference | p50 TTFT / reference | wall / reference |"),
             "|---|---|---|---|---|---|---|---|"]
    for name, row in summary.items():
        means = row["ttft_mean_ms"]
        loaded = ", ".join(f"{t} {n:g}" for t, n in sorted(row["loaded_blocks_per_pass"].items())) or "-"
        ratios = [fmt_ratio(row[k]) if k in row else "1" for k in
                  ("mean_vs_reference", "p50_vs_reference", "wall_vs_reference")]
        lines.append(f"| {name} | {statistics.median(means):.1f} ({min(means):.1f}-{max(means):.1f}) | "
                     f"{statistics.median(row['ttft_p50_ms']):.1f} | {statistics.median(row['wall_s']):.2f} | "
                     f"{loaded} | " + " | ".join(ratios) + " |")
    if "mean_vs_always" in summary.get("kvtier-disk", {}):
        lines += ["", ("Mean TTFT of kvtier-disk / kvtier-disk-always, paired by pass: "
                  f"{fmt_ratio(summary['kvtier-disk']['mean_vs_always'])}.")]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="small", help="kvtier_bench.models size")
    parser.add_argument("--prefixes", type=int, default=40)
    parser.add_argument("--prefix-tokens", type=int, default=2048)
    parser.add_argument("--suffix-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=1, help="tokens generated per request")
    parser.add_argument("--kv-fraction", type=float, default=0.25, help="share of the prefixes vLLM's KV space holds")
    parser.add_argument("--disk-dram", default="16MiB", help="the DRAM tier in front of disk in kvtier-disk")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--configs", default="reference,vllm,kvtier-disk,kvtier-disk-always,kvtier-dram",
                        help="also: kvtier-disk-async")
    add_allocator_arg(parser)
    parser.add_argument("--out", default="benchmarks/results/concurrent_reuse.json")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    from kvtier_bench.models import build_model, kv_bytes_per_token

    model = build_model(args.size)
    per_block = kv_bytes_per_token(model, 2 * kv_scale()) * BLOCK  # K and V in the models' dtype
    blocks_per_request = -(-(args.prefix_tokens + args.suffix_tokens + args.max_tokens) // BLOCK)
    kv = {"small": max(int(args.prefixes * args.kv_fraction), args.concurrency) * blocks_per_request * per_block,
          "reference": (args.prefixes + 2 * args.concurrency) * blocks_per_request * per_block}
    store = args.prefixes * blocks_per_request * per_block
    tmp = Path(tempfile.mkdtemp(prefix="kvtier-reuse-"))
    disk = {"kind": "disk", "capacity": str(4 * store), "path": str(tmp / "disk"),
            "codec": {"name": "lz4", "shuffle": True}}
    small_dram = {"kind": "dram", "capacity": args.disk_dram}
    kvtier = {"kvtier-disk": {"tiers": [small_dram, disk]},
              "kvtier-disk-always": {"tiers": [small_dram, {**disk, "path": str(tmp / "always")}],
                                     "promote_on_hit": "always"},
              "kvtier-dram": {"tiers": [{"kind": "dram", "capacity": str(2 * store)}, {**disk, "path": str(tmp / "dram")}]},
              # not run by default: kvtier-disk with loads between steps (connector.async_load)
              "kvtier-disk-async": {"tiers": [small_dram, {**disk, "path": str(tmp / "async")}],
                                    "connector": {"async_load": True}}}
    names = args.configs.split(",")
    if names[0] != "reference":
        raise SystemExit("--configs must start with reference (the baseline every ratio is paired with)")
    base = {"model": model, "prefixes": args.prefixes, "prefix_tokens": args.prefix_tokens,
            "suffix_tokens": args.suffix_tokens, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
            "max_model_len": blocks_per_request * BLOCK}
    specs = {name: {**base, "kv_bytes": kv["reference" if name == "reference" else "small"],
                    **({"kvtier": kvtier[name]} if name in kvtier else {})} for name in names}
    load_before = os.getloadavg()[0]
    try:
        engines = [EngineProcess(name, __file__, specs[name], allocator_env(args.allocator)) for name in names]
        raw = run_interleaved(engines, args.reps, "pass",
                              lambda r: f"mean TTFT {statistics.fmean(r['ttft']) * 1000:.0f} ms")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the disk tiers' files
    summary = summarise(raw)
    text = report(summary, args, (load_before, os.getloadavg()[0]), kv)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "raw": raw, "args": vars(args), "kv_bytes": kv}, indent=1))
    out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
