"""TTFT of a reused 2k-token prefix: kvtier DRAM hit vs kvtier disk hit vs recompute vs vLLM's resident
prefix hit, and kvtier's TTFT/ITL overhead when nothing hits. One engine per configuration, each in its own
process, all in one run on the same machine; ratios are taken within the run.

TTFT is the wall time of a 1-token greedy generate of the prompt (prefill + one sampled token). The no-hit
TTFT and ITL come from a fresh prompt generating 64 tokens through the engine's step loop, with a timestamp
per token: TTFT = first token - start, ITL = median (and mean) gap between the following tokens.
Usage: python benchmarks/bench_connector_ttft.py [--size base]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BLOCK = 128


def prompts(seed: int, n: int, length: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 4000) for _ in range(length)] for _ in range(n)]


def timed(llm, prompt: list[int], max_tokens: int) -> float:  # type: ignore[no-untyped-def]
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sampling = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=prompt)], sampling, use_tqdm=False)
    return time.perf_counter() - start


def stepped(llm, prompt: list[int], max_tokens: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Seconds from submission to each generated token, driving the engine one step at a time."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    start = time.perf_counter()
    engine.add_request(f"fresh-{start}", TokensPrompt(prompt_token_ids=prompt),
                       SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    stamps: list[float] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter() - start
            stamps += [now] * (len(out.outputs[0].token_ids) - len(stamps))
    return stamps


def worker(spec: dict) -> dict:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kwargs: dict = {}
    if spec.get("kvtier"):
        kwargs["kv_transfer_config"] = KVTransferConfig(kv_connector="KVTierConnector", kv_role="kv_both",
                                                        kv_connector_extra_config=spec["kvtier"])
    llm = LLM(model=spec["model"], dtype="bfloat16", max_model_len=4096, enforce_eager=True, seed=0,
              block_size=BLOCK, **kwargs)
    reps, length = spec["reps"], spec["length"]
    out: dict[str, list[float]] = {"miss_ttft": [], "resident_ttft": [], "tier_ttft": [], "fresh_ttft": [],
                                   "miss_itl": [], "miss_itl_mean": []}
    timed(llm, prompts(99, 1, 64)[0], 2)  # warm-up
    for i, prompt in enumerate(prompts(spec["seed"], reps, length)):
        out["miss_ttft"].append(timed(llm, prompt, 1))          # nothing cached anywhere: full prefill
        out["resident_ttft"].append(timed(llm, prompt, 1))      # vLLM's own prefix cache holds it
        time.sleep(0.5)                                         # let kvtier's async saves land
        while not llm.reset_prefix_cache():
            time.sleep(0.2)
        out["tier_ttft"].append(timed(llm, prompt, 1))          # only kvtier (if enabled) can serve it
        stamps = stepped(llm, prompts(1000 + spec["seed"] * 100 + i, 1, length)[0], 64)
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        out["fresh_ttft"].append(stamps[0])
        out["miss_itl"].append(statistics.median(gaps))
        out["miss_itl_mean"].append(statistics.mean(gaps))
    return {k: statistics.median(v) for k, v in out.items()}


def run(spec: dict) -> dict:
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}"),
               VLLM_CPU_KVCACHE_SPACE="2")
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                          check=False,
                          text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{spec.get('name')} failed:\n{proc.stderr[-4000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="base", help="kvtier_bench.models size (base is ~100M params)")
    parser.add_argument("--length", type=int, default=2048 + 1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/ttft.json")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    from kvtier_bench.models import build_model

    model = build_model(args.size)
    tmp = Path(tempfile.mkdtemp(prefix="kvtier-ttft-"))
    base = {"model": model, "reps": args.reps, "length": args.length, "seed": 1}
    dram = {"tiers": [{"kind": "dram", "capacity": "2GiB"},
                      {"kind": "disk", "capacity": "4GiB", "path": str(tmp / "d1")}]}
    disk = {"tiers": [{"kind": "dram", "capacity": "64KiB"},
                      {"kind": "disk", "capacity": "4GiB", "path": str(tmp / "d2"), "codec": "none"}]}
    results = {"plain": run({**base, "name": "plain"}),
               "kvtier_dram": run({**base, "name": "dram", "kvtier": dram}),
               "kvtier_disk": run({**base, "name": "disk", "kvtier": disk})}
    recompute = results["plain"]["miss_ttft"]
    summary = {
        "recompute_ttft_s": recompute,
        "vllm_resident_hit_ttft_s": results["plain"]["resident_ttft"],
        "kvtier_dram_hit_ttft_s": results["kvtier_dram"]["tier_ttft"],
        "kvtier_disk_hit_ttft_s": results["kvtier_disk"]["tier_ttft"],
        "plain_after_reset_ttft_s": results["plain"]["tier_ttft"],
        # no-hit: every prefill of a prompt nothing holds (first run of each reused prompt + the fresh ones)
        "no_hit_ttft_overhead": statistics.mean([results["kvtier_dram"][k] / results["plain"][k]
                                                 for k in ("miss_ttft", "fresh_ttft")]),
        "no_hit_itl_overhead": results["kvtier_dram"]["miss_itl"] / max(results["plain"]["miss_itl"], 1e-9),
        "no_hit_itl_mean_overhead": results["kvtier_dram"]["miss_itl_mean"] / max(results["plain"]["miss_itl_mean"],
                                                                                  1e-9),
    }
    print(f"model {args.size}, prompt {args.length} tokens ({(args.length - 1) // BLOCK * BLOCK} reusable), "
          f"median of {args.reps}")
    for name in ("recompute_ttft_s", "vllm_resident_hit_ttft_s", "kvtier_dram_hit_ttft_s", "kvtier_disk_hit_ttft_s"):
        print(f"  {name:28} {summary[name] * 1000:8.1f} ms   {recompute / summary[name]:5.2f}x faster than recompute")
    print(f"  no-hit overhead with kvtier: TTFT x{summary['no_hit_ttft_overhead']:.3f}, "
          f"ITL median x{summary['no_hit_itl_overhead']:.3f} ({results['kvtier_dram']['miss_itl'] * 1e3:.1f} vs "
          f"{results['plain']['miss_itl'] * 1e3:.1f} ms), ITL mean x{summary['no_hit_itl_mean_overhead']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "raw": results, "size": args.size,
                                          "length": args.length}, indent=2))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
