"""Trace-driven companion to bench_attention.py: the same workload replayed through a DRAM TierStack for a
sweep of capacities and seeds, hit rates only (no engine, so no TTFT).

The scores are not captured from a vLLM run: each request's post-RoPE queries and keys are recomputed with
the HF model on the same weights and fed to the same ``AttentionCapture`` code the worker runs (window mode,
request credit), as one prefill step. That equals what the worker computes while the earlier blocks' exact
keys are held (``attention.key_memory``), which covers this whole workload. Replay mirrors the connector:
lookup of the longest run of stored full blocks (minus the last token), a get per hit block (an access),
a put per new full block, then scores, sink marks and prefix links for the blocks just saved.

    python benchmarks/sim_attention.py [--capacities 24,30,36,40,48] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from attention_fallback_accuracy import qk_per_layer
from bench_attention import ATTENTION, BLOCK, Req, build_workload, hittable

from kvtier.attention.capture import AttentionCapture
from kvtier.config import KVTierConfig
from kvtier.tiers.stack import TierStack

POLICIES = {"lru": {"name": "lru"}, "lfu": {"name": "lfu"}, "arc": {"name": "arc"}, "attention": ATTENTION,
            "attention-shuffled": {**ATTENTION, "name": "kvtier_bench.controls:ShuffledScoresPolicy"},
            "attention-nocapture": ATTENTION}


class _Meta:
    def __init__(self, n: int, block_ids: list[int]) -> None:
        self.num_actual_tokens = n
        self.query_start_loc = torch.tensor([0, n])
        self.seq_lens = torch.tensor([n])
        self.block_table = torch.tensor([block_ids])
        self.slot_mapping = torch.tensor([block_ids[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)])


def request_scores(model: torch.nn.Module, reqs: list[Req], window: int) -> list[list[float]]:
    """Per request, the score of each of its blocks, as the worker's capture computes them."""
    layers = [f"layer{i}" for i in range(len(model.model.layers))]  # type: ignore[union-attr]
    out = []
    for r in reqs:
        capture = AttentionCapture("window", window, 1, BLOCK, num_blocks=64)
        capture._order = layers
        ids = list(range(1, -(-len(r.prompt) // BLOCK) + 1))
        meta = _Meta(len(r.prompt), ids)
        for name, (q, k) in zip(layers, qk_per_layer(model, r.prompt), strict=True):
            capture.observe(name, q, k, meta, q.shape[-1] ** -0.5)
        by_block, _ = capture.end_step()
        out.append([by_block.get(b, 0.0) for b in ids])
    return out


def chain(prompt: list[int]) -> list[bytes]:
    keys, h = [], b""
    for i in range(len(prompt) // BLOCK):
        h = hashlib.blake2b(h + str(prompt[i * BLOCK:(i + 1) * BLOCK]).encode(), digest_size=16).digest()
        keys.append(h)
    return keys


def replay(name: str, reqs: list[Req], scores: list[list[float]], capacity_blocks: int, block_bytes: int) -> list[int]:
    cfg = {"tiers": [{"kind": "dram", "capacity": capacity_blocks * (block_bytes + 4096), "page_size": 4096,
                      "policy": POLICIES[name]}]}
    stack = TierStack.from_config(KVTierConfig.from_dict(cfg, env={}))
    raw = bytes(block_bytes)
    served = []
    for r, sc in zip(reqs, scores, strict=True):
        keys = chain(r.prompt)
        hit = 0
        for key in keys[:(len(r.prompt) - 1) // BLOCK]:
            if stack.where(key) is None or stack.get(key) is None:
                break
            hit += 1
        served.append(hit * BLOCK)
        saved = [b for b, key in enumerate(keys) if stack.where(key) is None]
        for b in saved:
            stack.put(keys[b], raw)
        if name in ("attention", "attention-shuffled"):
            stack.update_scores({key: s for key, s in zip(keys, sc, strict=False) if s})
        stack.mark_sinks([keys[0]] if 0 in saved else [])
        stack.set_parents([(keys[b], keys[b - 1]) for b in saved if b > 0])
    return served


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="trained")
    parser.add_argument("--capacities", default="24,30,36,40,48")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results")
    args, _ = parser.parse_known_args(argv)
    from transformers import AutoModelForCausalLM

    from kvtier_bench.models import build_model

    model_dir = build_model(args.model) if args.model == "trained" else args.model
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    block_bytes = cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * BLOCK * 2 * cfg["head_dim"] * 2
    wl = argparse.Namespace(rounds=8, opens=6, engaged=2, gap=2, doc_blocks=4, question_len=48, answer_len=16)
    rates: dict[tuple[str, int], list[float]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        wl.seed = seed
        reqs = build_workload(model_dir, wl)
        can = hittable(reqs)
        scores = request_scores(model, reqs, args.window)
        follow = [i for i, r in enumerate(reqs) if r.turn > 0]
        for cap in [int(c) for c in args.capacities.split(",")]:
            for name in POLICIES:
                served = replay(name, reqs, scores, cap, block_bytes)
                rates.setdefault((name, cap), []).append(sum(served[i] for i in follow) / sum(can[i] for i in follow))
    caps = [int(c) for c in args.capacities.split(",")]
    title = (f"# Trace-driven replay: follow-up hit rate by DRAM capacity ({Path(model_dir).name}, seeds "
             f"{args.seeds}, window {args.window}; scores recomputed offline, see sim_attention.py)")
    lines = [title, "", "| policy | " + " | ".join(f"{c} blocks" for c in caps) + " |",
             "|---" * (len(caps) + 1) + "|"]
    for name in POLICIES:
        lines.append(f"| {name} | " + " | ".join(f"{statistics.mean(rates[(name, c)]):.3f}" for c in caps) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_sim.json").write_text(json.dumps({"args": vars(args), "follow_up_hit_rate": {
        f"{n}@{c}": v for (n, c), v in rates.items()}}, indent=1))
    (out / "attention_sim.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
