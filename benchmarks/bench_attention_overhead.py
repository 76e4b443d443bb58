"""Overhead of attention-score capture on ITL and TTFT, A/B-interleaved inside one vLLM engine.

The engine runs in one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the benchmark can reach the worker's
capture object and switch it between *off* and *window* capture with a given window and decode sampling period
(``W<window>/every<N>``; and *proxy* if asked) between repetitions; alternating the modes rep by rep cancels the
drift of a machine shared with other jobs. Per repetition and mode: a batch of ``--batch`` fresh prompts of
``--prompt-len`` tokens, TTFT = 1-token generate, ITL = (time of a ``1 + --decode``-token generate - TTFT) /
``--decode``. Overheads are paired by repetition (mode vs off in the same rep): mean and a 95% percentile-bootstrap
interval over reps. The hook's own time (``capture_time_s``) is reported per decode step too.

    python benchmarks/bench_attention_overhead.py [--model trained] [--reps 9] [--windows 16,32] [--every 1,16,64]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0)))))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def interval(values: list[float], seed: int = 0, resamples: int = 10_000) -> tuple[float, float, float]:
    """Mean and 95% percentile-bootstrap interval of the mean."""
    rng = random.Random(seed)
    means = sorted(statistics.mean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return statistics.mean(values), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def modes_of(args: argparse.Namespace) -> list[str]:
    modes = ["off"] + (["proxy"] if args.proxy else [])
    return modes + [f"W{w}/every{n}" for w in args.windows.split(",") for n in args.every.split(",")]


def set_mode(capture: Any, exact: Any, mode: str) -> None:
    capture.enabled = mode != "off"
    capture.mode = "proxy" if mode == "proxy" else "window"
    capture.exact = exact if mode.startswith("W") else None  # the exact-key store belongs to window mode only
    if mode.startswith("W"):
        window, every = mode[1:].split("/every")
        capture.window, capture.every_n = int(window), int(every)


def summarize(samples: dict[str, dict[str, list[float]]], modes: list[str]) -> list[dict[str, Any]]:
    table = []
    for mode in modes:
        row: dict[str, Any] = {"mode": mode}
        for metric in ("ttft", "itl"):
            paired = [100 * (m / o - 1) for m, o in zip(samples[mode][metric], samples["off"][metric], strict=True)]
            mean, low, high = interval(paired)
            row[f"{metric}_ms"] = round(1e3 * statistics.median(samples[mode][metric]), 2)
            row[f"{metric}_overhead_pct"] = {"mean": round(mean, 1), "ci95": [round(low, 1), round(high, 1)]}
        row["hook_ms_per_step"] = round(statistics.median(samples[mode]["hook_ms_per_step"]), 2)
        table.append(row)
    return table


def markdown(table: list[dict[str, Any]], args: argparse.Namespace, model: str) -> str:
    title = (f"# Attention capture overhead ({Path(model).name}, batch {args.batch} x {args.prompt_len} tokens, "
             f"{args.decode} decode steps, {args.reps} interleaved reps)")
    lines = [title, "", "Overheads: paired by rep against `off`, mean [95% bootstrap interval]. Times: medians.", "",
             f"Command: `python benchmarks/bench_attention_overhead.py {' '.join(sys.argv[1:])}`", "",
             "| capture | TTFT (ms) | TTFT vs off | ITL (ms) | ITL vs off | hook time per step (ms) |",
             "|---|---|---|---|---|---|"]
    for r in table:
        t, i = r["ttft_overhead_pct"], r["itl_overhead_pct"]
        lines.append(f"| {r['mode']} | {r['ttft_ms']} | {t['mean']:+.1f}% [{t['ci95'][0]:+.1f}, {t['ci95'][1]:+.1f}] "
                     f"| {r['itl_ms']} | {i['mean']:+.1f}% [{i['ci95'][0]:+.1f}, {i['ci95'][1]:+.1f}] | "
                     f"{r['hook_ms_per_step']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="trained")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--windows", default="16,32", help="window sizes to test")
    parser.add_argument("--every", default="1,16,64", help="decode sampling periods to test")
    parser.add_argument("--proxy", action="store_true", help="also the query-free proxy")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    from vllm.inputs import TokensPrompt

    from kvtier_bench.models import SIZES, build_model
    from kvtier_bench.procs import compute_dtype

    model = build_model(args.model) if args.model in (*SIZES, "trained") else args.model
    kvtier = {"tiers": [{"kind": "dram", "capacity": "1GiB", "policy": {"name": "attention"}}],
              "attention": {"capture": "window", "window": 16, "every_n_steps": 1}}
    llm = LLM(model=model, dtype=compute_dtype(), max_model_len=4096, enforce_eager=True, seed=0, block_size=128,
              kv_transfer_config=KVTransferConfig(kv_connector="KVTierConnector", kv_role="kv_both",
                                                  kv_connector_extra_config=kvtier))
    capture = get_kv_transfer_group()._worker.scores.capture  # type: ignore[attr-defined]
    exact = capture.exact
    modes = modes_of(args)
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
            set_mode(capture, exact, mode)
            ttft = timed(batch(), 1)
            before = capture.counters["capture_time_s"]
            total = timed(batch(), 1 + args.decode)
            hook = capture.counters["capture_time_s"] - before
            samples[mode]["ttft"].append(ttft)
            samples[mode]["itl"].append((total - ttft) / args.decode)
            samples[mode]["hook_ms_per_step"].append(1e3 * hook / (1 + args.decode))
    table = summarize(samples, modes)
    text = markdown(table, args, model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_overhead.json").write_text(json.dumps({"args": vars(args), "model": model, "table": table,
                                                             "samples": samples}, indent=1))
    (out / "attention_overhead.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
