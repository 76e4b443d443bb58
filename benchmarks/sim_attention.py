"""Attention-aware eviction vs LRU/LFU/ARC across workload families, seeds and capacities, by trace replay.

Families (kvtier_bench/families.py): ``engaged`` (engaged vs one-off documents), ``chat`` (multi-turn chat with
growing histories), ``rag`` (a few documents reused by many requests with different questions); each as a short
``default`` trace and a ``long`` one (engaged also a changed ``variant``), see FAMILIES. Scores come from the
trained model through the worker's own AttentionCapture code (kvtier_bench/replay.py). Rows: the baselines, the
``attention`` policy (attention-aware ARC), its controls (shuffled scores; no capture at all) and the earlier
score-decay policy (``attention-decay``).

Seeds were fixed before any evaluation run: the policy was developed on DEV_SEEDS only (and only on the default
and a long engaged trace); the reported tables use EVAL_SEEDS (``--seeds eval``). Follow-up hit rate = tokens
served by the tier on follow-up requests / tokens an unbounded cache could serve on them. Spread = sample
standard deviation over seeds.

    python benchmarks/sim_attention.py --seeds eval [--families engaged,chat,rag] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kvtier_bench.families import build, follow_ups, hittable
from kvtier_bench.replay import cached_scores, replay

DEV_SEEDS = (1000, 1001, 1002, 1003, 1004)
EVAL_SEEDS = (11, 23, 37, 41, 59, 73, 89)  # fixed before the first evaluation run; never tuned on

ATTENTION = {"name": "attention"}
DECAY = {"name": "attention-decay", "half_life_s": 3600, "protect_recent": 4, "protect_sinks": True}
# name -> (policy config, whether scores are fed)
POLICIES: dict[str, tuple[dict[str, Any], bool]] = {
    "lru": ({"name": "lru"}, False),
    "lfu": ({"name": "lfu"}, False),
    "arc": ({"name": "arc"}, False),
    "attention": (ATTENTION, True),
    "attention shuffled": ({"name": "kvtier_bench.controls:ShuffledScores", "policy": "attention"}, True),
    "attention no-capture": (ATTENTION, False),
    "attention-decay (old)": (DECAY, True),
}
BASELINES = ("lru", "lfu", "arc")
# family -> variant -> (workload params, DRAM capacities in blocks). ``default`` is each family's short trace
# (engaged: bench_attention.py's, 80 requests); ``long`` runs the same workload or a changed one for long enough
# that reuse statistics can form (the reuse gate needs a few dozen reused requests).
FAMILIES: dict[str, dict[str, tuple[dict[str, Any], tuple[int, ...]]]] = {
    "engaged": {"default": ({}, (24, 40)),
                "long": ({"rounds": 24}, (32, 48)),
                "variant": ({"rounds": 24, "opens": 8, "engaged": 3, "gap": 3, "doc_blocks": 3}, (40, 64))},
    "chat": {"default": ({}, (24, 48)),
             "long": ({"conversations": 64, "max_turns": 8, "think": 12.0, "quote_p": 0.3}, (32, 64))},
    "rag": {"default": ({}, (12, 24)),
            "long": ({"docs": 16, "requests": 320, "zipf": 0.8, "quote_p": 0.7}, (16, 32))},
}


def run_seed(model: torch.nn.Module, model_dir: str, family: str, variant: str, seed: int, args: argparse.Namespace,
             block_bytes: int) -> dict[str, Any]:
    params, capacities = FAMILIES[family][variant]
    reqs = build(family, model_dir, seed, params)
    can = hittable(reqs)
    follow = follow_ups(reqs)
    scores = cached_scores(model, model_dir, reqs, args.window, args.score_cache)
    out: dict[str, Any] = {"requests": len(reqs), "follow_ups": len(follow), "rates": {}, "gate": {}}
    for cap in capacities:
        for name, (policy, fed) in POLICIES.items():
            served, gate = replay(policy, reqs, scores if fed else None, cap, block_bytes)
            rate = sum(served[i] for i in follow) / max(1, sum(can[i] for i in follow))
            out["rates"][f"{name}@{cap}"] = rate
            if gate:
                out["gate"][f"{name}@{cap}"] = gate
    return out


def summarize(runs: dict[int, dict[str, Any]], capacities: tuple[int, ...]) -> dict[str, Any]:
    """Per policy and capacity: mean and spread over seeds; for attention, paired differences too."""
    seeds = sorted(runs)
    table: dict[str, Any] = {}
    for cap in capacities:
        per = {name: [runs[s]["rates"][f"{name}@{cap}"] for s in seeds] for name in POLICIES}
        best = max(BASELINES, key=lambda b: statistics.mean(per[b]))
        mine, shuf = per["attention"], per["attention shuffled"]
        diff_best = [m - b for m, b in zip(mine, per[best], strict=True)]
        diff_shuf = [m - c for m, c in zip(mine, shuf, strict=True)]
        table[str(cap)] = {
            "mean": {n: statistics.mean(v) for n, v in per.items()},
            "sd": {n: statistics.stdev(v) if len(v) > 1 else 0.0 for n, v in per.items()},
            "best_baseline": best,
            "vs_best": {"mean": statistics.mean(diff_best), "sd": _sd(diff_best),
                        "relative": statistics.mean(mine) / max(1e-9, statistics.mean(per[best])) - 1.0},
            "vs_shuffled": {"mean": statistics.mean(diff_shuf), "sd": _sd(diff_shuf)},
            "gate_open": sum(runs[s]["gate"].get(f"attention@{cap}", {}).get("open", 0.0) for s in seeds),
            "gate_open_shuffled": sum(runs[s]["gate"].get(f"attention shuffled@{cap}", {}).get("open", 0.0)
                                      for s in seeds),
        }
    return table


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"# Attention-aware eviction across workload families (trace replay, {meta['model_name']})", "",
             f"Seeds {meta['seeds']} ({len(meta['seeds'])}); window {meta['window']}. Cells: follow-up hit rate, "
             "mean ± sample sd over seeds. Δ best = attention minus the best of lru/lfu/arc (paired by seed, "
             "mean ± sd); Δ shuffled = attention minus its shuffled-score control (paired). Gate = seeds whose "
             "reuse gate was open at the end (attention / shuffled control).", "", f"Command: `{meta['command']}`",
             ""]
    for key, table in results.items():
        caps = list(table)
        lines += [f"## {key}", "", "| policy | " + " | ".join(f"{c} blocks" for c in caps) + " |",
                  "|---" * (len(caps) + 1) + "|"]
        for name in POLICIES:
            cells = [f"{table[c]['mean'][name]:.3f} ± {table[c]['sd'][name]:.3f}" for c in caps]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        rows = {"Δ best": lambda t: f"{t['vs_best']['mean']:+.3f} ± {t['vs_best']['sd']:.3f} "
                                    f"({t['vs_best']['relative']:+.0%} vs {t['best_baseline']})",
                "Δ shuffled": lambda t: f"{t['vs_shuffled']['mean']:+.3f} ± {t['vs_shuffled']['sd']:.3f}",
                "gate open": lambda t: f"{t['gate_open']:.0f} / {t['gate_open_shuffled']:.0f} of "
                                       f"{len(meta['seeds'])}"}
        for label, fmt in rows.items():
            lines.append(f"| *{label}* | " + " | ".join(fmt(table[c]) for c in caps) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="trained")
    parser.add_argument("--seeds", default="dev", help="dev, eval, or a comma-separated list")
    parser.add_argument("--families", default="engaged,chat,rag")
    parser.add_argument("--variants", default="default,long,variant", help="those a family has")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="attention_sim")
    parser.add_argument("--score-cache", default="", help="keep recomputed scores here (keyed by their inputs)")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from kvtier_bench.models import build_model

    seeds = {"dev": DEV_SEEDS, "eval": EVAL_SEEDS}.get(args.seeds) or tuple(int(s) for s in args.seeds.split(","))
    model_dir = build_model(args.model) if args.model == "trained" else args.model
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    block_bytes = cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * 128 * 2 * cfg["head_dim"] * 2
    results: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    for family in args.families.split(","):
        for variant in [v for v in args.variants.split(",") if v in FAMILIES[family]]:
            start = time.perf_counter()
            runs = {s: run_seed(model, model_dir, family, variant, s, args, block_bytes) for s in seeds}
            key = f"{family} / {variant}"
            raw[key] = {str(s): r for s, r in runs.items()}
            results[key] = summarize(runs, FAMILIES[family][variant][1])
            print(f"{key}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    meta = {"model_name": Path(model_dir).name, "seeds": list(seeds), "window": args.window,
            "families": {f: {v: {"params": p, "capacities": c} for v, (p, c) in vs.items()}
                         for f, vs in FAMILIES.items()},
            "policies": {n: {"config": p, "scores_fed": fed} for n, (p, fed) in POLICIES.items()},
            "command": "python " + " ".join(sys.argv)}
    text = markdown(results, meta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "summary": results, "runs": raw}, indent=1))
    (out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
