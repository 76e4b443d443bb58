"""Attention-aware eviction vs LRU, LFU and ARC on real vLLM runs, on a workload where attention matters.

Workload (kvtier_bench.families.engaged, "engaged vs one-off documents"): conversations share a 1-block system
prompt; each opens with its own document (``--doc-blocks`` blocks of Python stdlib source) and a question. An
*engaged* conversation's question quotes its document (the model's attention goes to the document) and the user
comes back twice, ``--gap`` and ``2*gap`` rounds later, with follow-up quotes; a *one-off* conversation's question
is a passage of the same kind of text taken from elsewhere, and it never returns. Each round opens ``--opens``
conversations (``--engaged`` of them engaged) and then serves the follow-ups that are due. The DRAM tier (the only
tier) holds ``--dram-blocks`` blocks, fewer than the blocks opened between a conversation's opening and its first
follow-up, so a policy must pick. At the first follow-up every document has been used exactly once, so LRU, LFU
and ARC cannot tell engaged from one-off documents; attention scores can (kvtier.attention, window mode, scores
per layer). The model is the trained tiny Llama (``kvtier_bench.models.build_model("trained")``).

Each policy runs in its own engine process (vLLM CPU build), with vLLM's prefix cache reset before every request
so every reuse is served by kvtier or recomputed. Rows: the ``attention`` policy, its controls (the same policy fed
*shuffled* scores, kvtier_bench.controls.ShuffledScores; and with capture off) and the earlier score-decay policy.

Reproducibility: by default saves are synchronous (``connector.sync_saves``): each step stores its blocks, applies
their scores and prefix links, and reports the placement events before it returns, so the next request's lookup
and the policy see the same order on every run. ``--repeat N`` runs every seed N times and reports whether the
repeats served exactly the same tokens; ``--jitter-ms`` adds random delays to the worker's stores and reads
(kvtier_bench.connector) to stand in for a loaded machine. Seeds (default: the first five of sim_attention.py's
EVAL_SEEDS) were fixed before any run.

    python benchmarks/bench_attention.py [--rounds 8] [--dram-blocks 40] [--seeds 11,23,37,41,59] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path


from kvtier_bench.attention_report import aggregate, markdown, summarize
from kvtier_bench.families import BLOCK, Req, engaged, hittable, open_source
from kvtier_bench.procs import compute_dtype
from kvtier_bench.runner import cpu_list

SEEDS = "11,23,37,41,59"  # sim_attention.EVAL_SEEDS[:5], fixed before any run
SHUFFLED = {"name": "kvtier_bench.controls:ShuffledScores", "policy": "attention"}
DECAY = {"name": "attention-decay", "half_life_s": 3600, "protect_recent": 4, "protect_sinks": True}
POLICIES: dict[str, tuple[dict, str]] = {
    "lru": ({"name": "lru"}, "off"),
    "lfu": ({"name": "lfu"}, "off"),
    "arc": ({"name": "arc"}, "off"),
    "attention": ({"name": "attention"}, "window"),
    "attention-shuffled": (SHUFFLED, "window"),
    "attention-nocapture": ({"name": "attention"}, "off"),
    "attention-decay": (DECAY, "window"),
}


def build_workload(model: str, args: argparse.Namespace) -> list[Req]:
    return engaged(open_source(model, args.seed), rounds=args.rounds, opens=args.opens, engaged=args.engaged,
                   gap=args.gap, doc_blocks=args.doc_blocks, question_len=args.question_len,
                   answer_len=args.answer_len)


# ---- one engine per policy (child process) ---------------------------------------------------------------

def child(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from kvtier_bench.configs import transfer_config

    transfer = KVTransferConfig(**transfer_config(spec["kvtier"]))
    llm = LLM(model=spec["model"], dtype=compute_dtype(), max_model_len=4096, enforce_eager=True, seed=0,
              block_size=BLOCK, kv_transfer_config=transfer)
    sampling = SamplingParams(temperature=0, max_tokens=1)
    llm.generate([TokensPrompt(prompt_token_ids=[0] * 300)], sampling, use_tqdm=False)  # warm-up
    rows = []
    for prompt in spec["prompts"]:
        while not llm.reset_prefix_cache():
            time.sleep(0.05)
        start = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], sampling, use_tqdm=False)[0]
        rows.append({"ttft_s": time.perf_counter() - start, "cached": out.num_cached_tokens})
        time.sleep(spec["settle_s"])  # with asynchronous saves: let them land before the next lookup
    return {"rows": rows}


def run_policy(name: str, model: str, reqs: list[Req], args: argparse.Namespace, block_bytes: int) -> dict:
    policy, capture = POLICIES[name]
    # 4 KiB pages: a record is a 56-byte header + the block, so it takes block_bytes + one page.
    kvtier: dict = {"tiers": [{"kind": "dram", "capacity": args.dram_blocks * (block_bytes + 4096),
                               "page_size": 4096, "policy": policy}],
                    "attention": {"capture": capture, "window": args.window}}
    if args.sync_saves:
        kvtier["connector"] = {"sync_saves": True}
    settle = 0.0 if args.sync_saves else args.settle
    spec = {"model": model, "kvtier": kvtier, "prompts": [r.prompt for r in reqs], "settle_s": settle}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, stats = Path(tmp) / "spec.json", Path(tmp) / "stats.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", cpu_list()),
                   VLLM_CPU_KVCACHE_SPACE="1", KVTIER_STATS_FILE=str(stats))
        if args.jitter_ms:
            env["KVBENCH_JITTER_MS"] = str(args.jitter_ms)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path)], env=env, text=True,
                              capture_output=True, timeout=3600, check=False)
        for line in proc.stdout.splitlines():
            if line.startswith("BENCH-RESULT "):
                result = json.loads(line[len("BENCH-RESULT "):])
                result["wall_s"] = round(time.perf_counter() - start, 1)
                result["stats"] = json.loads(stats.read_text()) if stats.exists() else {}
                result["capture_log"] = [ln for ln in proc.stderr.splitlines() if "attention capture" in ln][:2]
                return result
    raise RuntimeError(f"{name}: engine run failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="trained", help="kvtier_bench.models size or a model directory")
    parser.add_argument("--policies", default="lru,lfu,arc,attention,attention-shuffled,attention-nocapture")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--opens", type=int, default=6)
    parser.add_argument("--engaged", type=int, default=2)
    parser.add_argument("--gap", type=int, default=2)
    parser.add_argument("--doc-blocks", type=int, default=4)
    parser.add_argument("--question-len", type=int, default=48)
    parser.add_argument("--answer-len", type=int, default=16)
    parser.add_argument("--dram-blocks", type=int, default=40)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--sync-saves", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--settle", type=float, default=0.2, help="seconds after each request (async saves only)")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="random delays in stores and reads (stress)")
    parser.add_argument("--seeds", default=SEEDS)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="attention")
    args = parser.parse_args(argv)
    if args.child:
        print("BENCH-RESULT " + json.dumps(child(json.loads(Path(args.child).read_text()))), flush=True)
        return 0
    from kvtier_bench.models import SIZES, build_model

    model = build_model(args.model) if args.model in (*SIZES, "trained") else args.model
    config = json.loads((Path(model) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    block_bytes = config["num_hidden_layers"] * config["num_key_value_heads"] * BLOCK * 2 * head_dim * 2
    runs: dict[str, list[dict]] = {}
    for seed in [int(x) for x in args.seeds.split(",")]:
        args.seed = seed
        reqs = build_workload(model, args)
        can_hit = hittable(reqs)
        for name in args.policies.split(","):
            for rep in range(args.repeat):
                s = summarize(name, reqs, run_policy(name, model, reqs, args, block_bytes), can_hit)
                s["seed"], s["repeat"] = seed, rep
                runs.setdefault(name, []).append(s)
                print(f"seed {seed} {name:>20} #{rep}: hit rate all {s['all']['hit_rate']:.3f}, follow-ups "
                      f"{s['follow-ups']['hit_rate']:.3f}, 1st {s['first follow-ups']['hit_rate']:.3f} "
                      f"({s['wall_s']} s)", flush=True)
    table = [aggregate(r) for r in runs.values()]
    meta = {"model": model, "model_name": Path(model).name, "requests": len(reqs), "seeds": args.seeds,
            "rounds": args.rounds, "repeats": args.repeat, "conversations": len({r.conv for r in reqs}),
            "engaged": len({r.conv for r in reqs if r.engaged}), "dram_blocks": args.dram_blocks,
            "saves": "synchronous" if args.sync_saves else f"asynchronous, {args.settle} s settle",
            "args": vars(args), "cpus": os.cpu_count(), "command": "python " + " ".join(sys.argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "table": table, "runs": runs,
                                                       "requests": [asdict(r) | {"prompt": len(r.prompt)}
                                                                    for r in reqs]}, indent=1))
    (out / f"{args.name}.md").write_text(markdown(table, meta))
    print(markdown(table, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
