"""How close the capture's fallback (Gaussian block summaries for keys not computed in the current step) comes
to the exact window attention, on the trained model's real queries and keys.

For prompts shaped like bench_attention's (shared block + 4-block document + question), the post-RoPE queries
and keys of every layer are recomputed from the HF model (a pre-hook on each attention module). Per prompt
and layer: exact per-block mass (all keys exact) vs the mass when the first ``--prior-blocks`` blocks are
summarised, as after a prefix hit. Reports the mean total-variation distance between the two per-block
distributions and how often the block ranking (Spearman) is preserved; also the key-norm proxy's rank
correlation with the exact window scores.

    python benchmarks/attention_fallback_accuracy.py [--model trained] [--prompts 12]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch

from kvtier.attention.scores import BlockStats, stats_from_keys, window_block_mass
from kvtier_bench.replay import qk_per_layer

BLOCK = 128


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / ((ra.norm() * rb.norm()).clamp_min(1e-12)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="trained")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--prior-blocks", type=int, default=5)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from kvtier_bench.models import SIZES, build_model
    from kvtier_bench.train import load_corpus

    model_dir = build_model(args.model) if args.model in (*SIZES, "trained") else args.model
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    user = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")).token_to_id("<|user|>")
    stream, _ = load_corpus(Path(model_dir) / "tokenizer.json", 3_000_000)
    rng = random.Random(1)
    tv, rank, proxy_rank = [], [], []
    for i in range(args.prompts):
        doc = stream[(at := rng.randrange(len(stream) - 600)):at + 4 * BLOCK]
        q_at = rng.randrange(len(doc) - 48)
        question = doc[q_at:q_at + 48] if i % 2 == 0 else stream[(o := rng.randrange(len(stream) - 48)):o + 48]
        ids = [0] + stream[:BLOCK - 1] + doc + [user] + question + stream[:16]  # + a 16-token answer start
        n = len(ids)
        first = args.prior_blocks * BLOCK
        q_pos = torch.arange(n - args.window, n)
        for q, k in qk_per_layer(model, ids):
            scale = q.shape[-1] ** -0.5
            exact = window_block_mass(q[-args.window:], q_pos, k, 0, BlockStats.empty(k.shape[1], k.shape[2]),
                                      BLOCK, scale)
            approx = window_block_mass(q[-args.window:], q_pos, k[first:], first, stats_from_keys(k[:first], BLOCK),
                                       BLOCK, scale)
            p, r = exact / exact.sum(), approx / approx.sum()
            tv.append(0.5 * float((p - r).abs().sum()))
            rank.append(spearman(exact[:args.prior_blocks], approx[:args.prior_blocks]))
            inv = torch.stack([(1 / k[b * BLOCK:(b + 1) * BLOCK].norm(dim=-1)).mean()
                               for b in range(args.prior_blocks)])
            proxy_rank.append(spearman(exact[:args.prior_blocks], inv))
    result = {"model": Path(model_dir).name, "prompts": args.prompts, "prior_blocks": args.prior_blocks,
              "mean_total_variation": round(statistics.mean(tv), 4), "max_total_variation": round(max(tv), 4),
              "mean_spearman_summary_vs_exact": round(statistics.mean(rank), 3),
              "mean_spearman_keynorm_proxy_vs_exact": round(statistics.mean(proxy_rank), 3)}
    print(json.dumps(result, indent=1))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "attention_fallback.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
