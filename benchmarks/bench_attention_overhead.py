"""Overhead of attention-score capture on ITL and TTFT, A/B-interleaved inside one vLLM engine.

The engine runs in one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the benchmark can reach the worker's
capture object and switch it between *off*, *proxy* and *window* (every ``N`` decode steps) between
repetitions; alternating the modes rep by rep cancels the drift of a machine shared with other jobs.
Per repetition and mode: a batch of ``--batch`` fresh prompts of ``--prompt-len`` tokens, TTFT = 1-token
generate, ITL = (time of a ``1 + --decode``-token generate - TTFT) / ``--decode``. The hook's own time
(``capture_time_s``) is reported per decode step too.

    python benchmarks/bench_attention_overhead.py [--model trained] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="trained")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--every", default="1,16", help="decode sampling periods to test in window mode")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    from vllm.inputs import TokensPrompt

    from kvtier_bench.models import SIZES, build_model

    model = build_model(args.model) if args.model in (*SIZES, "trained") else args.model
    kvtier = {"tiers": [{"kind": "dram", "capacity": "1GiB", "policy": {"name": "attention"}}],
              "attention": {"capture": "window", "window": args.window, "every_n_steps": 1}}
    llm = LLM(model=model, dtype="bfloat16", max_model_len=4096, enforce_eager=True, seed=0, block_size=128,
              kv_transfer_config=KVTransferConfig(kv_connector="KVTierConnector", kv_role="kv_both",
                                                  kv_connector_extra_config=kvtier))
    capture = get_kv_transfer_group()._worker.scores.capture  # type: ignore[attr-defined]
    exact = capture.exact  # the exact-key store belongs to window mode only
    modes = ["off", "proxy"] + [f"window/{n}" for n in args.every.split(",")]
    rng = random.Random(0)

    def batch() -> list[TokensPrompt]:
        return [TokensPrompt(prompt_token_ids=[rng.randrange(10, 4000) for _ in range(args.prompt_len)])
                for _ in range(args.batch)]

    def timed(prompts: list[TokensPrompt], tokens: int) -> float:
        sampling = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts, sampling, use_tqdm=False)
        return time.perf_counter() - start

    timed(batch(), 4)  # warm-up
    samples: dict[str, dict[str, list[float]]] = {m: {"ttft": [], "itl": [], "hook_ms_per_step": []} for m in modes}
    for rep in range(args.reps):
        for mode in modes if rep % 2 == 0 else list(reversed(modes)):
            capture.enabled = mode != "off"
            capture.mode = "proxy" if mode == "proxy" else "window"
            capture.every_n = int(mode.split("/")[1]) if mode.startswith("window/") else 1
            capture.exact = exact if mode.startswith("window/") else None
            ttft = timed(batch(), 1)
            before = capture.counters["capture_time_s"]
            total = timed(batch(), 1 + args.decode)
            hook = capture.counters["capture_time_s"] - before
            samples[mode]["ttft"].append(ttft)
            samples[mode]["itl"].append((total - ttft) / args.decode)
            samples[mode]["hook_ms_per_step"].append(1e3 * hook / (1 + args.decode))
    off = statistics.median(samples["off"]["itl"])
    table = []
    for mode in modes:
        itl = statistics.median(samples[mode]["itl"])
        table.append({"mode": mode, "ttft_ms": round(1e3 * statistics.median(samples[mode]["ttft"]), 1),
                      "itl_ms": round(1e3 * itl, 2), "itl_overhead_pct": round(100 * (itl / off - 1), 1),
                      "hook_ms_per_step": round(statistics.median(samples[mode]["hook_ms_per_step"]), 2)})
    title = (f"# Attention capture overhead ({Path(model).name}, batch {args.batch} x {args.prompt_len} tokens, "
             f"{args.decode} decode steps, median of {args.reps} interleaved reps)")
    lines = [title, "",
             "| capture | TTFT (ms) | ITL (ms) | ITL vs off | hook time per step (ms) |", "|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['ttft_ms']} | {r['itl_ms']} | {r['itl_overhead_pct']:+.1f}% | "
              f"{r['hook_ms_per_step']} |" for r in table]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_overhead.json").write_text(json.dumps({"args": vars(args), "model": model, "table": table,
                                                             "samples": samples}, indent=1))
    (out / "attention_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
