"""kvtier's data path between vLLM-style paged KV tensors and host memory: bandwidth against plain copies, and
the time a save adds to a step. Needs PyTorch (CUDA where present), not vLLM.

    python benchmarks/bench_transfer.py                  # CUDA if present (HBM <-> pinned DRAM), else CPU
    python benchmarks/bench_transfer.py --device cpu --quick
    python benchmarks/bench_transfer.py --out-dir benchmarks/results   # also transfer_<device>.json / .md

Bandwidth rows, in GB/s of KV bytes moved (1 GB = 1e9 B), median over ``--reps`` timed runs after warm-up,
``--batch`` blocks at scattered block ids, every layer:
  - ``save (device->staging)``: KVCopier.save through the staging pool until its fence is done: what a save's
    copy costs the device (per chunk and group of layers: index_select into a bounded device buffer, one copy).
  - ``load (staging->device)``: KVCopier.load from staged records into the blocks until the last fence is done.
  - ``copy d2h`` / ``copy h2d``: one plain ``Tensor.copy_`` of the same bytes between a contiguous device tensor
    and a preallocated pinned host tensor: the ceiling. ``copy d2h pageable`` on CUDA only.
  - ``unstage (host)`` / ``stage (host)``: the host-side reorder between staging and block records (a save's
    work after its copy, off the engine thread on CUDA; a load's before its copy).
Step overhead: ``--steps`` steps of fixed compute (a matmul loop of about ``--step-ms``), each ending in
WorkerSide.wait_for_save of ``--save-blocks`` blocks (into a DRAM tier), against the same steps without
saves: the step time each configuration sees (wall time per step, the compute stream synchronised per step,
the save copies not), median over the steps of interleaved repetitions.
On a CPU-only machine "device" memory is ordinary memory: the rows are host copies of different shapes, and the
copies of a save are plain (complete when issued), so the step pays them. Pass ``--threads 1`` on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvtier.config import KVTierConfig
from kvtier.connector.metadata import KVTierMetadata
from kvtier.connector.worker import WorkerSide
from kvtier.transfer import KVCopier, KVLayout, StagingPool

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_caches(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """Per-layer KV tensors: flash-attention ``[2, blocks, block, heads, head]`` or vLLM CPU ``[blocks, heads,
    block, 2*head]``."""
    shape = ((2, args.num_blocks, args.block_size, args.heads, args.head_size) if args.layout == "flash" else
             (args.num_blocks, args.heads, args.block_size, 2 * args.head_size))
    return {f"model.layers.{i}.self_attn.attn": torch.randn(shape, device=device).to(DTYPES[args.dtype])
            for i in range(args.layers)}


def timed(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    """Median seconds of ``fn`` (device work included)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bandwidth_cases(args: argparse.Namespace, caches: dict[str, torch.Tensor], device: torch.device,
                    ids: list[int]) -> dict[str, Callable[[], object]]:
    cuda = device.type == "cuda"
    layout = KVLayout(caches, args.num_blocks)
    pool = StagingPool(layout.block_bytes, args.staging_mib << 20, args.chunk_mib << 20, pin=cuda)
    copier = KVCopier(layout, pool)
    per = pool.chunk_blocks
    slots = pool.acquire(-(-len(ids) // per))
    chunks = []
    for k, slot in enumerate(slots):
        part = ids[k * per:(k + 1) * per]
        slot.ids.numpy()[:len(part)] = part
        chunks.append((slot, len(part)))
    records = np.empty((len(ids), layout.block_bytes), dtype=np.uint8)  # bytes do not matter here
    nbytes = len(ids) * layout.block_bytes
    flat_dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    flat_host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)

    def unstage() -> None:
        start = 0
        for slot, n in chunks:
            layout.unstage(slot.data.numpy(), n, records[start:start + n])
            start += n

    def stage() -> None:
        start = 0
        for slot, n in chunks:
            data = slot.data.numpy()
            for i in range(n):
                layout.stage(data, n, i, records[start + i])
            start += n
    cases: dict[str, Callable[[], object]] = {
        "save (device->staging)": lambda: copier.save(chunks).wait(),
        "load (staging->device)": lambda: copier.load(chunks, copier.compute_mark())[-1].wait(),
        "copy d2h": lambda: flat_host.copy_(flat_dev, non_blocking=cuda),
        "copy h2d": lambda: flat_dev.copy_(flat_host, non_blocking=cuda),
        "unstage (host)": unstage,
        "stage (host)": stage,
    }
    if cuda:
        pageable = torch.empty(nbytes, dtype=torch.uint8)
        cases["copy d2h pageable"] = lambda: pageable.copy_(flat_dev)
    return cases


def step_overhead(args: argparse.Namespace, caches: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """Step time with and without a save of ``--save-blocks`` blocks at the end of each step."""
    cfg = KVTierConfig.from_dict({"tiers": [{"kind": "dram", "capacity": f"{args.dram_mib}MiB"}],
                                  "connector": {"staging_bytes": f"{args.staging_mib}MiB",
                                                "staging_chunk_bytes": f"{args.chunk_mib}MiB"}}, env={})
    worker = WorkerSide(cfg, args.num_blocks)
    worker.register_kv_caches(caches)
    size = 2048 if device.type == "cuda" else 256
    a = torch.randn(size, size, device=device)
    compute_reps = calibrate(a, device, args.step_ms)
    counter = iter(range(1 << 40))
    in_call: list[float] = []  # host time inside wait_for_save, per step with a save

    def steps(save: bool) -> list[float]:
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            b = a
            for _ in range(compute_reps):
                b = b @ a / size
            meta = KVTierMetadata()
            if save:
                meta.saves = [(next(counter).to_bytes(16, "little"), next(counter) % args.num_blocks)
                              for _ in range(args.save_blocks)]
                meta.save_reqs = ["bench"]
            called = time.perf_counter()
            worker.wait_for_save(meta)
            if save:
                in_call.append(time.perf_counter() - called)
            if device.type == "cuda":
                torch.cuda.current_stream().synchronize()  # the step's compute, not the save copies
            times.append(time.perf_counter() - start)
        return times

    steps(False), steps(True)  # warm-up
    with_save: list[float] = []
    without: list[float] = []
    for _ in range(args.overhead_reps):  # interleaved, so slow phases of a shared machine hit both
        without += steps(False)
        with_save += steps(True)
        worker.drain()
    worker.shutdown()
    base, saved = statistics.median(without), statistics.median(with_save)
    return {"step_ms": base * 1e3, "step_with_save_ms": saved * 1e3, "save_blocks_per_step": args.save_blocks,
            "save_bytes_per_step": args.save_blocks * KVLayout(caches, args.num_blocks).block_bytes,
            "added_ms": (saved - base) * 1e3, "added_pct": (saved - base) / base * 100,
            "wait_for_save_ms": statistics.median(in_call) * 1e3}


def calibrate(a: torch.Tensor, device: torch.device, target_ms: float) -> int:
    """How many matmuls of ``a`` take about ``target_ms``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reps = 4
    while True:
        sync()
        start = time.perf_counter()
        b = a
        for _ in range(reps):
            b = b @ a / a.shape[0]
        sync()
        ms = (time.perf_counter() - start) * 1e3
        if ms >= target_ms / 4 or reps > 1 << 16:
            return max(1, int(reps * target_ms / max(ms, 1e-3)))
        reps *= 4


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    caches = make_caches(args, device)
    layout = KVLayout(caches, args.num_blocks)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randperm(args.num_blocks, generator=gen)[:args.batch].tolist()
    nbytes = len(ids) * layout.block_bytes
    rows = []
    for name, fn in bandwidth_cases(args, caches, device, ids).items():
        seconds = timed(fn, device, args.reps, args.warmup)
        rows.append({"case": name, "bytes": nbytes, "seconds": seconds, "gb_per_s": nbytes / seconds / 1e9})
    by_case = {r["case"]: r["gb_per_s"] for r in rows}
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()}, "
                                                                  f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__, "layout": args.layout, "kv_layout": layout.describe(),
        "batch_blocks": args.batch, "bytes_per_transfer": nbytes, "reps": args.reps, "rows": rows,
        "save_vs_copy_d2h": by_case["save (device->staging)"] / by_case["copy d2h"],
        "load_vs_copy_h2d": by_case["load (staging->device)"] / by_case["copy h2d"],
        "step": step_overhead(args, caches, device),
    }


def markdown(result: dict[str, Any]) -> str:
    step = result["step"]
    lines = [f"# kvtier transfer path: {result['device']}, torch {result['torch']}", "",
             f"KV layout: {result['kv_layout']}; {result['batch_blocks']} blocks per transfer "
             f"({result['bytes_per_transfer'] / 2**20:.1f} MiB), median of {result['reps']}.", "",
             "| case | GB/s | ms |", "|---|---|---|"]
    lines += [f"| {r['case']} | {r['gb_per_s']:.2f} | {r['seconds'] * 1e3:.3f} |" for r in result["rows"]]
    lines += ["", f"save / plain copy d2h = {result['save_vs_copy_d2h']:.2f}, "
                  f"load / plain copy h2d = {result['load_vs_copy_h2d']:.2f}", "",
              f"Step of {step['step_ms']:.2f} ms; with a save of {step['save_blocks_per_step']} blocks "
              f"({step['save_bytes_per_step'] / 2**20:.1f} MiB) at its end: {step['step_with_save_ms']:.2f} ms "
              f"({step['added_ms']:+.3f} ms, {step['added_pct']:+.1f}%); wait_for_save itself took "
              f"{step['wait_for_save_ms']:.3f} ms (median).", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--layout", choices=["flash", "cpu"], default=None,
                        help="KV tensor layout (default: flash on CUDA, cpu on CPU)")
    parser.add_argument("--layers", type=int, default=None, help="default 32 on CUDA, 8 on CPU")
    parser.add_argument("--num-blocks", type=int, default=None, help="default 2048 on CUDA, 256 on CPU")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--heads", type=int, default=8, help="KV heads")
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=None, help="blocks per transfer (default 128 CUDA, 32 CPU)")
    parser.add_argument("--staging-mib", type=int, default=512, help="staging pool (connector.staging_bytes)")
    parser.add_argument("--chunk-mib", type=int, default=16, help="staging chunk (connector.staging_chunk_bytes)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50, help="steps per step-overhead run")
    parser.add_argument("--step-ms", type=float, default=20.0, help="compute per step")
    parser.add_argument("--save-blocks", type=int, default=8, help="blocks saved at the end of each step")
    parser.add_argument("--overhead-reps", type=int, default=5)
    parser.add_argument("--dram-mib", type=int, default=512, help="DRAM tier the saves go to")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (on a busy shared CPU, 1 avoids waiting for starved threads)")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--out-dir", help="also write transfer_<device>.json and .md here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is false on this machine")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    args.layout = args.layout or ("flash" if cuda else "cpu")
    args.layers = args.layers or (32 if cuda else 8)
    args.num_blocks = args.num_blocks or (2048 if cuda else 256)
    args.batch = args.batch or (128 if cuda else 32)
    if args.quick:
        args.layers, args.num_blocks, args.reps, args.warmup = min(args.layers, 4), min(args.num_blocks, 128), 5, 1
        args.steps, args.overhead_reps, args.step_ms = 10, 2, min(args.step_ms, 5.0)
        args.staging_mib, args.dram_mib = min(args.staging_mib, 64), min(args.dram_mib, 64)
    args.batch = min(args.batch, args.num_blocks)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(markdown(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        kind = "cuda" if args.device == "cuda" else "cpu"
        (out / f"transfer_{kind}.json").write_text(json.dumps(result, indent=2))
        (out / f"transfer_{kind}.md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
