"""Attention-weighted eviction vs LRU, LFU and ARC on real vLLM runs, on a workload where attention matters.

Workload ("engaged vs one-off documents"): conversations share a 1-block system prompt; each opens with its
own document (``--doc-blocks`` blocks of Python stdlib source) and a question. An *engaged* conversation's
question quotes its document (the model's attention goes to the document) and the user comes back twice,
``--gap`` and ``2*gap`` rounds later, with follow-up quotes; a *one-off* conversation's question is a passage
of the same kind of text (stdlib source) taken from elsewhere, and it never returns. Both kinds of question come
from one distribution, so nothing but where the model attends tells them apart (an earlier version used English
questions for one-offs, which let the key-norm proxy separate them by the question's own keys). Each round opens
``--opens`` conversations (``--engaged`` of them engaged) and then
serves the follow-ups that are due. The DRAM tier (the only tier) holds ``--dram-blocks`` blocks, fewer than
the blocks opened between a conversation's opening and its first follow-up, so a policy must pick.

At the moment of the first follow-up every document has been used exactly once, so LRU, LFU and ARC see no
difference between engaged and one-off documents; the attention policy does, through the scores captured
from the model (kvtier.attention, window mode). The model is the trained tiny Llama
(``kvtier_bench.models.build_model("trained")``); a random-weight model attends flatly and gives no signal.

Each policy runs in its own engine process (vLLM CPU build), with vLLM's prefix cache reset before every
request so every reuse is served by kvtier or recomputed. TTFT = wall time of a 1-token greedy generate.
Extra rows: the attention policy with capture off (decayed hit counts only), with the key-norm proxy, and
fed *shuffled* scores (random draws from the real ones: same spread, no information; kvtier_bench.controls)
- on this workload LRU is pathological and any perturbation of recency order gains something, so the signal
is worth the gap between ``attention`` and ``attention-shuffled``, not the gap to LRU.

    python benchmarks/bench_attention.py [--rounds 8] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BLOCK = 128
# Scores decay with a half-life: it should exceed the reuse gap of the workload (here tens of seconds to a few
# minutes on a loaded 2-core machine); with 300 s (the default) a fresh one-off block outranks an engaged one
# scored two rounds earlier once the small score gap has decayed away.
ATTENTION = {"name": "attention", "half_life_s": 3600, "protect_recent": 4, "protect_sinks": True}
POLICIES: dict[str, tuple[dict, str]] = {
    "lru": ({"name": "lru"}, "off"),
    "lfu": ({"name": "lfu"}, "off"),
    "arc": ({"name": "arc"}, "off"),
    "attention": (ATTENTION, "window"),
    "attention-shuffled": ({**ATTENTION, "name": "kvtier_bench.controls:ShuffledScoresPolicy"}, "window"),
    "attention-proxy": (ATTENTION, "proxy"),
    "attention-nocapture": (ATTENTION, "off"),
}


@dataclass
class Req:
    conv: int
    turn: int  # 0 = opening, 1.. = follow-ups
    engaged: bool
    prompt: list[int]


def build_workload(model: str, args: argparse.Namespace) -> list[Req]:
    """Deterministic request sequence (see the module docstring)."""
    from tokenizers import Tokenizer

    from kvtier_bench.train import load_corpus

    tok = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    user = tok.token_to_id("<|user|>")
    stream, _ = load_corpus(Path(model) / "tokenizer.json", 3_000_000)
    rng = random.Random(args.seed)
    system = [0] + stream[:BLOCK - 1]  # BOS + one shared block

    def span(n: int, source: list[int] = stream) -> list[int]:
        at = rng.randrange(BLOCK, len(source) - n)
        return source[at:at + n]

    def quote(doc: list[int]) -> list[int]:
        at = rng.randrange(len(doc) - args.question_len)
        return doc[at:at + args.question_len]

    docs: dict[int, list[int]] = {}
    history: dict[int, list[int]] = {}
    due: dict[int, list[int]] = {}
    reqs: list[Req] = []
    conv = 0
    for rnd in range(args.rounds + 2 * args.gap):
        if rnd < args.rounds:
            for i in range(args.opens):
                engaged = i < args.engaged
                docs[conv] = span(args.doc_blocks * BLOCK)
                question = quote(docs[conv]) if engaged else span(args.question_len)
                history[conv] = system + docs[conv] + [user] + question
                reqs.append(Req(conv, 0, engaged, list(history[conv])))
                if engaged:
                    due.setdefault(rnd + args.gap, []).append(conv)
                    due.setdefault(rnd + 2 * args.gap, []).append(conv)
                conv += 1
        for c in due.pop(rnd, []):
            history[c] = history[c] + span(args.answer_len) + [user] + quote(docs[c])
            reqs.append(Req(c, sum(r.conv == c for r in reqs), True, list(history[c])))
    return reqs


def hittable(reqs: list[Req]) -> list[int]:
    """Tokens of each prompt an unbounded cache could serve: whole blocks seen before, minus the last token."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for r in reqs:
        full = (len(r.prompt) - 1) // BLOCK
        hit = 0
        while hit < full and tuple(r.prompt[:(hit + 1) * BLOCK]) in seen:
            hit += 1
        out.append(hit * BLOCK)
        for b in range(1, len(r.prompt) // BLOCK + 1):
            seen.add(tuple(r.prompt[:b * BLOCK]))
    return out


# ---- one engine per policy (child process) ---------------------------------------------------------------

def child(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from kvtier_bench.configs import transfer_config

    transfer = KVTransferConfig(**transfer_config(spec["kvtier"]))
    llm = LLM(model=spec["model"], dtype="bfloat16", max_model_len=4096, enforce_eager=True, seed=0,
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
        time.sleep(spec["settle_s"])  # async saves land before the next lookup
    return {"rows": rows}


def run_policy(name: str, model: str, reqs: list[Req], args: argparse.Namespace, block_bytes: int) -> dict:
    policy, capture = POLICIES[name]
    # 4 KiB pages: a record is a 56-byte header + the block, so it takes block_bytes + one page.
    kvtier = {"tiers": [{"kind": "dram", "capacity": args.dram_blocks * (block_bytes + 4096), "page_size": 4096,
                         "policy": policy}],
              "attention": {"capture": capture, "window": args.window}}
    spec = {"model": model, "kvtier": kvtier, "prompts": [r.prompt for r in reqs], "settle_s": args.settle}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, stats = Path(tmp) / "spec.json", Path(tmp) / "stats.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
                   VLLM_CPU_KVCACHE_SPACE="1", KVTIER_STATS_FILE=str(stats))
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


# ---- summary -----------------------------------------------------------------------------------------------

def summarize(name: str, reqs: list[Req], result: dict, can_hit: list[int]) -> dict:
    """Hit rates and TTFT per request group. ``ttft_rel`` divides by the run's median opening TTFT (openings
    miss in every policy alike), which cancels the load drift between runs on a shared machine."""
    rows = result["rows"]
    groups = {"all": range(len(reqs)), "follow-ups": [i for i, r in enumerate(reqs) if r.turn > 0],
              "first follow-ups": [i for i, r in enumerate(reqs) if r.turn == 1]}
    base = statistics.median(rows[i]["ttft_s"] for i, r in enumerate(reqs) if r.turn == 0)
    out: dict = {"policy": name, "wall_s": result["wall_s"], "capture": result["capture_log"],
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
    out["rows"] = rows
    return out


def average(runs: list[dict]) -> dict:
    """Mean over seeds of each group's numbers."""
    out = {"policy": runs[0]["policy"], "seeds": len(runs)}
    for group in ("all", "follow-ups", "first follow-ups"):
        out[group] = {k: statistics.mean(r[group][k] for r in runs) for k in ("hit_rate", "ttft_mean_ms", "ttft_rel")}
    out["evictions"] = statistics.mean(r["dram"]["evictions"] for r in runs)
    return out


def markdown(table: list[dict], meta: dict) -> str:
    intro = (f"Per seed: {meta['requests']} requests ({meta['conversations']} conversations, {meta['engaged']} "
             f"engaged); seeds {meta['seeds']}; DRAM tier {meta['dram_blocks']} blocks of {BLOCK} tokens. Hit rate ="
             " tokens served by kvtier / tokens an unbounded cache could serve. TTFT = 1-token generate wall time;"
             " rel. = divided by the same run's median opening TTFT (all policies miss on openings), which cancels"
             " the load drift of the shared machine. Means over seeds.")
    header = ("| policy | hit rate all | hit rate follow-ups | hit rate 1st follow-ups | TTFT follow-ups (ms) "
              "| TTFT follow-ups rel. | TTFT all rel. | evictions |")
    lines = [f"# Attention-weighted eviction vs LRU/LFU/ARC ({meta['model_name']}, real vLLM CPU runs)", "",
             intro, "", header, "|---|---|---|---|---|---|---|---|"]
    for s in table:
        a, f, f1 = s["all"], s["follow-ups"], s["first follow-ups"]
        lines.append(f"| {s['policy']} | {a['hit_rate']:.3f} | {f['hit_rate']:.3f} | {f1['hit_rate']:.3f} | "
                     f"{f['ttft_mean_ms']:.1f} | {f['ttft_rel']:.2f} | {a['ttft_rel']:.2f} | {s['evictions']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="trained", help="kvtier_bench.models size or a model directory")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--opens", type=int, default=6)
    parser.add_argument("--engaged", type=int, default=2)
    parser.add_argument("--gap", type=int, default=2)
    parser.add_argument("--doc-blocks", type=int, default=4)
    parser.add_argument("--question-len", type=int, default=48)
    parser.add_argument("--answer-len", type=int, default=16)
    parser.add_argument("--dram-blocks", type=int, default=40)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--settle", type=float, default=0.2)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default="benchmarks/results")
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
            s = summarize(name, reqs, run_policy(name, model, reqs, args, block_bytes), can_hit)
            s["seed"] = seed
            runs.setdefault(name, []).append(s)
            print(f"seed {seed} {name:>20}: hit rate all {s['all']['hit_rate']:.3f}, follow-ups "
                  f"{s['follow-ups']['hit_rate']:.3f}, TTFT follow-ups {s['follow-ups']['ttft_mean_ms']:.1f} ms "
                  f"(rel {s['follow-ups']['ttft_rel']:.2f}) ({s['wall_s']} s)", flush=True)
    table = [average(r) for r in runs.values()]
    meta = {"model": model, "model_name": Path(model).name, "requests": len(reqs), "seeds": args.seeds,
            "conversations": len({r.conv for r in reqs}), "engaged": len({r.conv for r in reqs if r.engaged}),
            "dram_blocks": args.dram_blocks, "args": vars(args), "cpus": os.cpu_count()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention.json").write_text(json.dumps({"meta": meta, "table": table, "runs": runs,
                                                    "requests": [asdict(r) | {"prompt": len(r.prompt)}
                                                                 for r in reqs]}, indent=1))
    (out / "attention.md").write_text(markdown(table, meta))
    print(markdown(table, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
