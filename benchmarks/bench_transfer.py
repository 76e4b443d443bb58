"""Copy bandwidth between vLLM-style paged KV tensors and host memory: kvtier's KVLayout vs plain torch copies.

    python benchmarks/bench_transfer.py                  # CUDA if present (HBM <-> pinned DRAM), else CPU
    python benchmarks/bench_transfer.py --device cpu --quick
    python benchmarks/bench_transfer.py --layout cpu --batch 16 --out results/bench_transfer.json

Rows, in GB/s of KV bytes moved (1 GB = 1e9 B), median over ``--reps`` timed runs after warm-up:
  - ``gather``: ``KVLayout.gather(ids)``: ``--batch`` blocks at scattered block ids, every layer, into a new host
    buffer (pinned on CUDA), complete on return. This is what a save does.
  - ``scatter``: ``KVLayout.scatter(ids, host)`` from a pinned host buffer into those blocks. This is a load.
  - ``copy d2h`` / ``copy h2d``: one plain ``Tensor.copy_`` of the same number of bytes between a contiguous device
    tensor and a preallocated pinned host tensor (the ceiling for a transfer of that size).
  - ``copy d2h pageable``: the same into ordinary (pageable) host memory, on CUDA only.
On a CPU-only machine "device" memory is ordinary memory too: every row is a host memcpy of some shape, and
the numbers say what the gather/scatter indexing costs over a flat copy. On a busy machine pass ``--threads 1``:
torch's parallel copies otherwise wait for intra-op threads that other processes starve (seen here: a 2 MiB
copy took 12 ms with 2 threads and 0.5 ms with 1 on 2 cores at load average 6).
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

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvtier.transfer import KVLayout

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_caches(layout: str, layers: int, num_blocks: int, block: int, heads: int, head: int,
                dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Per-layer KV tensors: flash-attention ``[2, blocks, block, heads, head]`` or vLLM CPU ``[blocks, heads,
    block, 2*head]``."""
    shape = (2, num_blocks, block, heads, head) if layout == "flash" else (num_blocks, heads, block, 2 * head)
    return {f"model.layers.{i}.self_attn.attn": torch.randn(shape, dtype=torch.float32, device=device).to(dtype)
            for i in range(layers)}


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    caches = make_caches(args.layout, args.layers, args.num_blocks, args.block_size, args.heads, args.head_size,
                         DTYPES[args.dtype], device)
    layout = KVLayout(caches, args.num_blocks)
    nbytes = args.batch * layout.block_bytes
    gen = torch.Generator().manual_seed(0)
    ids = torch.randperm(args.num_blocks, generator=gen)[:args.batch].tolist()
    host = layout.gather(ids)
    flat_dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    flat_host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    cases: dict[str, Callable[[], object]] = {
        "gather": lambda: layout.gather(ids),
        "scatter": lambda: layout.scatter(ids, host),
        "copy d2h": lambda: flat_host.copy_(flat_dev, non_blocking=cuda),
        "copy h2d": lambda: flat_dev.copy_(flat_host, non_blocking=cuda),
    }
    if cuda:
        pageable = torch.empty(nbytes, dtype=torch.uint8)
        cases["copy d2h pageable"] = lambda: pageable.copy_(flat_dev)
    rows = []
    for name, fn in cases.items():
        seconds = timed(fn, device, args.reps, args.warmup)
        rows.append({"case": name, "bytes": nbytes, "seconds": seconds, "gb_per_s": nbytes / seconds / 1e9})
    by_case = {r["case"]: r["gb_per_s"] for r in rows}
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()}, "
                                                                  f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__, "layout": args.layout, "kv_layout": layout.describe(),
        "batch_blocks": args.batch, "bytes_per_transfer": nbytes, "reps": args.reps, "rows": rows,
        "gather_vs_copy_d2h": by_case["gather"] / by_case["copy d2h"],
        "scatter_vs_copy_h2d": by_case["scatter"] / by_case["copy h2d"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--layout", choices=["flash", "cpu"], default=None,
                        help="KV tensor layout (default: flash on CUDA, cpu on CPU)")
    parser.add_argument("--layers", type=int, default=None, help="default 32 on CUDA, 8 on CPU")
    parser.add_argument("--num-blocks", type=int, default=None, help="default 1024 on CUDA, 256 on CPU")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--heads", type=int, default=8, help="KV heads")
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=32, help="blocks per transfer")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (on a busy shared CPU, 1 avoids waiting for starved threads)")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is false on this machine")
    args.layout = args.layout or ("flash" if cuda else "cpu")
    args.layers = args.layers or (32 if cuda else 8)
    args.num_blocks = args.num_blocks or (1024 if cuda else 256)
    if args.quick:
        args.layers, args.num_blocks, args.reps, args.warmup = min(args.layers, 4), min(args.num_blocks, 128), 5, 1
    args.batch = min(args.batch, args.num_blocks)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(f"{result['device']}, torch {result['torch']}: {result['kv_layout']}")
    print(f"{result['batch_blocks']} blocks per transfer = {result['bytes_per_transfer'] / 2**20:.1f} MiB, "
          f"median of {result['reps']}")
    for row in result["rows"]:
        print(f"  {row['case']:<18} {row['gb_per_s']:8.2f} GB/s  ({row['seconds'] * 1e3:.3f} ms)")
    print(f"  gather / copy d2h = {result['gather_vs_copy_d2h']:.2f}, "
          f"scatter / copy h2d = {result['scatter_vs_copy_h2d']:.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
