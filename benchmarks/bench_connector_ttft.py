"""The hit path against vLLM's own: TTFT of a reused 2k-token prefix served by vLLM's resident prefix cache, by
kvtier's DRAM tier and by its disk tier (page cache warm), the recompute, and kvtier's TTFT/ITL overhead when
nothing hits.

One engine per configuration, each in its own process, all started first and kept up; the repetitions are
interleaved (every configuration's rep 1, then rep 2, ...; the order rotates) and only the engine being measured
runs: the others are stopped (SIGSTOP), so they take no CPU from it. Each rep of an engine, on prompts no engine
saw before:
  miss      a 1-token generate of a fresh prompt: the full prefill (nothing holds it)
  resident  the same again after a 0.3 s pause: vLLM's own prefix cache serves it
  tier      another 0.3 s pause, then reset_prefix_cache (the engine stepped until it succeeds): only kvtier can
            serve it
Both hits start after the same pause, so they find the processor's caches in the same state (the miss's saves
have landed by then, so a kvtier engine's resident hit is vLLM's own with nothing beside it). Before, the
resident hit ran right after the miss, whose KV was still in the L3 cache, and the tier hit after the pause.
  decode    another fresh prompt generating --decode-tokens tokens, one engine step at a time: TTFT and the
            median gap between tokens (ITL)
  drain     kvtier's saves still in flight (the decode prompt's) land before the rep ends; the engine is stopped
            between its reps, and until 2026-12-02 they ran on into its next rep's miss (and its figures)
Ratios are paired by rep (same prompts, same moment) and summarised as the geometric mean with a 95% bootstrap
interval over reps.

Allocator: kvtier's worker sets glibc's allocator to keep freed memory (kvtier/hostmem.py), which is
process-wide and also speeds up vLLM's own CPU work (a 2k-token miss ~5-12% faster here). With ``--allocator
kvtier`` (the default) every engine, plain included, starts with the same settings (GLIBC_TUNABLES), so the
ratios measure the connector; ``--allocator default`` leaves plain vLLM's allocator as shipped.

kvtier's own cost is also measured directly, inside each kvtier engine (in-process): every method of kvtier's
connector that vLLM calls is wrapped with a timer (the time it adds to the engine's steps), and the CPU time of
kvtier's own threads (named kvtier-*; from /proc/self/task/<tid>/schedstat) is read around each phase:
  miss      hooks during the miss + kvtier's threads from the miss to the end of the pause after it (the miss's
            saves run there), as a share of the miss TTFT
  decode    hooks and kvtier's threads over the decode steps of the ``decode`` generate, per step (the prefill's
            saves run beside those steps)
On two cores both OMP threads compute, so a kvtier thread's CPU time is at most the wall time it takes from the
engine: hooks + threads is an upper bound of what kvtier adds, free of the few-percent offsets between engine
processes that the cross-process ratios carry (``--configs plain,plain-b,...`` measures those: a second plain
engine paired with the first).
What kvtier's threads actually take is measured too: the time every other thread of each engine (vLLM's;
kvtier's excluded) spent waiting for a CPU, from schedstat, during the miss and per decode step, against
plain's in the same rep.

How close to memory speed: each kvtier engine also times the tier hit's load (its ``start_load_kv``: fetch, verify,
copy into vLLM's blocks) and, right after, the machine's floor for the same bytes in the same process (one copy
between two buffers and its xxh3 checksum, best of 5). No load that verifies what it copies beats that floor, so
(resident + floor) / resident is the best hit/resident ratio this machine allows; both are reported.

Guard: the prefill rate (prompt tokens / miss TTFT) of every engine and rep is recorded. A run whose rates
spread by more than ``--max-rate-spread`` (e.g. one engine's threads oversubscribed, or a busy machine) is
marked invalid and exits 3; the OMP threads are bound to the cores this process may use (its affinity mask).

Usage: python benchmarks/bench_connector_ttft.py [--size base] [--reps 8] [--out benchmarks/results/ttft_base.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvtier_bench.inengine import (
    Hooks,
    Sched,
    drain,
    loaded_bytes,
    memory_floor,
    sched,
    since,
    time_hooks,
)
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
    prompt,
    run_interleaved,
    wait_for_startup_work,
)


# ---- worker process: one engine, commands on stdin ---------------------------------------------------------
def _generate(llm: Any, tokens: list[int], max_tokens: int, hooks: Hooks | None = None,
              decode: list[tuple[float, float, float]] | None = None) -> list[float]:
    """Seconds from submission to each generated token, driving the engine one step at a time. ``decode`` gets,
    from the first token to the last: (CPU seconds of kvtier's threads, seconds the engine's other threads waited
    for a CPU, seconds in the connector's methods as counted by ``hooks`` from ``_time_hooks``, 0 without)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    start = time.perf_counter()
    engine.add_request(f"r-{start}", TokensPrompt(prompt_token_ids=tokens),
                       SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    stamps: list[float] = []
    first: tuple[Sched, float] | None = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter() - start
            stamps += [now] * (len(out.outputs[0].token_ids) - len(stamps))
            if decode is not None and first is None and stamps:
                first = sched(), hooks.total if hooks is not None else 0.0  # once: /proc is not read every step
    if decode is not None and first is not None:
        decode.append((*since(first[0]), hooks.total - first[1] if hooks is not None else 0.0))
    return stamps


def _reset(llm: Any) -> None:
    """Drop vLLM's own prefix cache. It refuses while blocks are held, e.g. a finished request's blocks whose
    save copies an engine step has not reported yet: step the engine until it succeeds."""
    engine = llm.llm_engine
    deadline = time.monotonic() + 30
    while not llm.reset_prefix_cache():
        if time.monotonic() > deadline:
            raise RuntimeError("reset_prefix_cache kept failing for 30 s")
        engine.step()
        time.sleep(0.01)


def worker(spec: dict[str, Any]) -> None:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kwargs: dict[str, Any] = {}
    if spec.get("kvtier"):
        kwargs["kv_transfer_config"] = KVTransferConfig(kv_connector="KVTierConnector", kv_role="kv_both",
                                                        kv_connector_extra_config=spec["kvtier"])
    llm = LLM(model=spec["model"], dtype=compute_dtype(), max_model_len=4096, enforce_eager=True, seed=0,
              block_size=BLOCK, **kwargs)
    hooks = time_hooks() if spec.get("kvtier") else None
    wait_for_startup_work()
    _rep(llm, spec["length"], -1, spec["decode"], hooks)  # warm-up: a whole rep (allocator, pools, files) first
    print("READY", flush=True)
    for line in sys.stdin:
        print("RESULT " + json.dumps(_rep(llm, spec["length"], int(line), spec["decode"], hooks)), flush=True)


def _rep(llm: Any, length: int, rep: int, decode: int, hooks: Hooks | None = None) -> dict[str, float]:
    reused = prompt(10_000 + rep, length)
    before, hooks_before = sched(), hooks.total if hooks is not None else 0.0
    out = {"miss": _generate(llm, reused, 1)[0]}
    out["wait_miss"] = since(before)[1]
    if hooks is not None:
        out["hooks_miss"] = hooks.total - hooks_before
    time.sleep(0.3)  # background saves land (a load would wait for them anyway)
    if hooks is not None:
        out["threads_miss"] = since(before)[0]
    out["resident"] = _generate(llm, reused, 1)[0]
    time.sleep(0.3)  # the same pause before the tier hit
    _reset(llm)
    load_before = hooks.load if hooks is not None else 0.0
    loaded_before = loaded_bytes(hooks)
    out["tier"] = _generate(llm, reused, 1)[0]
    if hooks is not None:  # the hit's load inside the engine, and the machine's floor for those bytes
        out["load"] = hooks.load - load_before
        out["floor"] = memory_floor(loaded_bytes(hooks) - loaded_before)
    steps: list[tuple[float, float, float]] = []
    stamps = _generate(llm, prompt(20_000 + rep, length), decode, hooks, steps)
    out["decode_ttft"] = stamps[0]
    out["itl"] = statistics.median(b - a for a, b in itertools.pairwise(stamps))
    threads, wait, spent = (x / (len(stamps) - 1) for x in steps[0])  # per decode step (after the first token)
    out["wait_per_step"] = wait
    if hooks is not None:  # kvtier's time per decode step
        out["hooks_per_step"] = spent
        out["threads_per_step"] = threads
    _reset(llm)
    # the decode prompt's saves land now, not inside this engine's next rep
    drain(hooks.connector if hooks is not None else None)
    return out


# ---- parent ------------------------------------------------------------------------------------------------
def summarise(raw: dict[str, list[dict[str, float]]], length: int, max_spread: float) -> dict[str, Any]:
    """Ratios paired with ``plain``'s reps. kvtier's engines are those whose reps carry its own timings; any
    other (a second plain engine) is a control: only its miss, decode and ITL ratios are reported."""
    plain = raw["plain"]
    kvtier = [name for name, reps in raw.items() if "hooks_miss" in reps[0]]

    def paired(name: str, metric: str, base: str) -> dict[str, Any]:
        return geo_interval([r[metric] / p[base] for r, p in zip(raw[name], plain)])

    medians = {name: {k: round(statistics.median(r[k] for r in reps) * 1000, 3) for k in reps[0]}
               for name, reps in raw.items()}
    rates = {name: [round(length / r["miss"]) for r in reps] for name, reps in raw.items()}
    every = [x for v in rates.values() for x in v]
    spread = max(every) / min(every)
    return {
        "medians_ms": medians,
        "prefill_tokens_per_s": rates,
        "prefill_rate_spread": round(spread, 3),
        "valid": spread <= max_spread,
        "hit_vs_resident": {name: paired(name, "tier", "resident") for name in kvtier},
        "hit_vs_own_resident": {name: geo_interval([r["tier"] / r["resident"] for r in raw[name]]) for name in kvtier},
        "hit_vs_recompute": {name: paired(name, "tier", "miss") for name in kvtier},
        # the load against the machine's floor for its bytes, and the hit/resident ratio that floor allows at best
        "load_vs_floor": {name: geo_interval([r["load"] / r["floor"] for r in raw[name]]) for name in kvtier},
        "floor_hit_vs_resident": {name: geo_interval([1 + r["floor"] / p["resident"] for r, p in zip(raw[name], plain)])
                                  for name in kvtier},
        "miss_overhead": {name: {"ttft": paired(name, "miss", "miss"), "decode_ttft": paired(name, "decode_ttft",
                                                                                             "decode_ttft"),
                                 "itl": paired(name, "itl", "itl")} for name in raw if name != "plain"},
        # kvtier's own time (hooks + its threads' CPU) over the time it was spent in: 1.01 = at most 1% added
        "own_time": {name: {"miss": geo_interval([1 + (r["hooks_miss"] + r["threads_miss"]) / r["miss"]
                                                  for r in raw[name]]),
                            "step": geo_interval([1 + (r["hooks_per_step"] + r["threads_per_step"]) / r["itl"]
                                                  for r in raw[name]])} for name in kvtier},
        # how much longer the engine's own threads waited for a CPU than plain's did, over the time: what
        # kvtier's threads (or anything else in that process) actually took from the engine
        "extra_wait": {name: {"miss": geo_interval([1 + (r["wait_miss"] - p["wait_miss"]) / r["miss"]
                                                    for r, p in zip(raw[name], plain)]),
                              "step": geo_interval([1 + (r["wait_per_step"] - p["wait_per_step"]) / r["itl"]
                                                    for r, p in zip(raw[name], plain)])}
                       for name in raw if name != "plain"},
    }


def report(summary: dict[str, Any], args: argparse.Namespace, load: tuple[float, float]) -> str:
    m = summary["medians_ms"]
    rates = [x for v in summary["prefill_tokens_per_s"].values() for x in v]
    lines = [(f"# Hit path: model {args.size}, {args.length} tokens ({(args.length - 1) // BLOCK * BLOCK} reusable), "
             f"{args.reps} interleaved reps, {args.decode_tokens} decode tokens"), "",
             (f"Command: `python benchmarks/bench_connector_ttft.py {' '.join(sys.argv[1:])}`; load average "
             f"{load[0]:.2f} before, {load[1]:.2f} after; OMP threads bound to cores {cpu_list()}; allocator of "
             f"every engine: {ALLOCATORS[args.allocator]}."), "",
             (f"Prefill rate (tokens/s, every engine and rep): {min(rates)}-{max(rates)}, spread "
             f"{summary['prefill_rate_spread']:.2f}x: {'valid' if summary['valid'] else 'INVALID (machine disturbed)'}"),
             "", ("| configuration | miss TTFT ms | resident hit ms | after reset ms | decode TTFT ms | ITL ms | "
                  "kvtier per miss: hooks + threads ms | kvtier per decode step: hooks + threads ms |"),
             "|---|---|---|---|---|---|---|---|"]
    for name, med in m.items():
        own = [f"{med['hooks_miss']:.2f} + {med['threads_miss']:.2f}",
               f"{med['hooks_per_step']:.3f} + {med['threads_per_step']:.3f}"] if "hooks_miss" in med else ["–", "–"]
        lines.append(f"| {name} | {med['miss']} | {med['resident']} | {med['tier']} | {med['decode_ttft']} | "
                     f"{med['itl']} | " + " | ".join(own) + " |")
    lines += ["", "Ratios (geometric mean over reps, paired, 95% bootstrap interval):", "",
              ("| configuration | hit / vLLM resident hit (plain) | hit / its engine's resident hit | "
               "hit / recompute | miss TTFT | decode TTFT | ITL | (miss + kvtier's time) / miss | "
               "(step + kvtier's time) / step |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for name, o in summary["miss_overhead"].items():
        mine = [summary[key].get(name) for key in ("hit_vs_resident", "hit_vs_own_resident", "hit_vs_recompute")]
        own = summary["own_time"].get(name)
        cells = mine + [o["ttft"], o["decode_ttft"], o["itl"]] + ([own["miss"], own["step"]] if own else [None, None])
        lines.append(f"| {name} | " + " | ".join("–" if c is None else fmt_ratio(c) for c in cells) + " |")
    lines += ["", ("The engine's threads waiting for a CPU (every thread but kvtier's; schedstat), against plain's in "
                   "the same rep:"), "", ("| configuration | wait per miss ms | wait per decode step ms | (miss + extra wait) "
                                    "/ miss | (step + extra wait) / step |"), "|---|---|---|---|---|"]
    for name, med in m.items():
        extra = summary["extra_wait"].get(name)
        cells = ["–", "–"] if extra is None else [fmt_ratio(extra["miss"]), fmt_ratio(extra["step"])]
        lines.append(f"| {name} | {med['wait_miss']} | {med['wait_per_step']} | " + " | ".join(cells) + " |")
    lines += ["", ("kvtier's time: its connector hooks (in the engine's steps) plus its threads' CPU (at most the "
                   "wall time they take from the engine on these two cores), measured inside the engine; the "
                   "cross-process columns also carry the offsets between engine processes (a control row, a second "
                   "plain engine, shows their size).")]
    lines += ["", ("The hit's load inside the engine (kvtier's start_load_kv: fetch, verify, copy into vLLM's blocks) "
                   "against the machine's floor for the same bytes (one copy between two buffers plus its xxh3 "
                   "checksum, best of 5, in the same process right after the hit): the hit/resident ratio that floor "
                   "allows is (resident + floor) / resident, whatever the code:"), "",
              ("| configuration | load ms | floor ms | load / floor | hit / resident at the floor | hit / resident "
               "measured |"), "|---|---|---|---|---|---|"]
    for name, ratio in summary["load_vs_floor"].items():
        med = m[name]
        lines.append(f"| {name} | {med['load']} | {med['floor']} | {fmt_ratio(ratio)} | "
                     f"{fmt_ratio(summary['floor_hit_vs_resident'][name])} | "
                     f"{fmt_ratio(summary['hit_vs_resident'][name])} |")
    return "\n".join(lines) + "\n"


def disk_only(path: Path, **disk: Any) -> list[dict[str, Any]]:
    """Tiers whose DRAM tier is too small for one block, so every hit is read from the disk tier at ``path``."""
    return [{"kind": "dram", "capacity": "64KiB"}, {"kind": "disk", "capacity": "4GiB", "path": str(path), **disk}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="base", help="kvtier_bench.models size (base is ~100M params)")
    parser.add_argument("--length", type=int, default=2048 + 1)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens generated for the ITL")
    parser.add_argument("--configs", default="plain,dram,disk,disk-none",
                        help="plain first; plain-b: a second plain engine (a control for the cross-process ratios)")
    parser.add_argument("--max-rate-spread", type=float, default=1.5)
    add_allocator_arg(parser)
    parser.add_argument("--out", default="benchmarks/results/ttft_base.json")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    from kvtier_bench.models import build_model

    tmp = Path(tempfile.mkdtemp(prefix="kvtier-ttft-"))
    shm = Path(tempfile.mkdtemp(prefix="kvtier-ttft-", dir="/dev/shm")) if Path("/dev/shm").is_dir() else tmp
    tiers = {"dram": [{"kind": "dram", "capacity": "2GiB"},
                      {"kind": "disk", "capacity": "4GiB", "path": str(tmp / "dram")}],
             # the DRAM tier without its pool faulted in ahead (prefault: false): each save faults its pages in
             "dram-cold": [{"kind": "dram", "capacity": "2GiB", "prefault": False},
                           {"kind": "disk", "capacity": "4GiB", "path": str(tmp / "dram-cold")}],
             # a DRAM tier too small for one block: every hit is read from disk (the page cache: warm)
             "disk": disk_only(tmp / "disk"),
             "disk-none": disk_only(tmp / "none", codec="none"),
             # the same on a tmpfs (/dev/shm): the page cache without a filesystem's block allocation, journal
             # and writeback under it (a control for what the disk tier's saves cost the engine)
             "disk-none-shm": disk_only(shm / "none", codec="none"),
             # disk, with the threads that encode and write saves at the engine's priority (connector.save_idle
             # false, save_nice 0), and at niceness 19 (the default before SCHED_IDLE)
             "disk-nice0": disk_only(tmp / "nice0"),
             "disk-nice19": disk_only(tmp / "nice19")}
    connector = {"disk-nice0": {"save_idle": False, "save_nice": 0}, "disk-nice19": {"save_idle": False}}
    base = {"model": build_model(args.size), "length": args.length, "decode": args.decode_tokens}
    names = args.configs.split(",")
    if names[0] != "plain":
        raise SystemExit("--configs must start with plain (the baseline every ratio is paired with)")
    load_before = os.getloadavg()[0]
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", **allocator_env(args.allocator)}
    unknown = [n for n in names[1:] if n not in tiers and n != "plain-b"]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown} (expected plain, plain-b or one of {sorted(tiers)})")
    try:
        kvtier = {n: {"tiers": t, **({"connector": connector[n]} if n in connector else {})} for n, t in tiers.items()}
        engines = [EngineProcess(n, __file__, {**base, **({"kvtier": kvtier[n]} if n in tiers else {})}, env)
                   for n in names]
        raw = run_interleaved(engines, args.reps, "rep", lambda r: f"hit {r['tier'] * 1000:.1f} ms")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the disk tiers' files: ~1 GB per run
        shutil.rmtree(shm, ignore_errors=True)
    summary = summarise(raw, args.length, args.max_rate_spread)
    text = report(summary, args, (load_before, os.getloadavg()[0]))
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "raw": raw, "size": args.size, "length": args.length,
                               "command": sys.argv[1:]}, indent=1))
    out.with_suffix(".md").write_text(text)
    return 0 if summary["valid"] else 3


if __name__ == "__main__":
    sys.exit(main())
