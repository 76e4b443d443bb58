"""Throughput of DramTier and DiskTier against plain copies and dd-style file I/O on the same machine, same run.

    python benchmarks/bench_tiers.py --quick            # ~32 MiB per case, one repetition
    python benchmarks/bench_tiers.py --out results/bench_tiers.json --total-mib 256 --reps 3

For each record size (512 KiB and 4 MiB by default) it measures, in MB/s of raw block bytes (1 MB = 1e6 B):
  - baselines: numpy memcpy into a preallocated pool, ``bytes`` copy-out, dd-style file write (with and without
    fsync) and read (warm page cache, and cold after dropping the files from the cache);
  - DramTier and DiskTier with codec none and lz4: ``put`` = encode + checksum + store, ``get`` = load +
    verify + decode (what the stack does), and for DRAM also the store-only and load-only paths.
Each tier result carries its ratio to the matching baseline. Data is bf16 Gaussian noise (KV-like, nearly
incompressible); compression ratios on real KV blocks are in the codec benchmark, not here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable without installing it
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvtier.codecs import HEADER_SIZE, BlockCodec
from kvtier.config import CodecConfig
from kvtier.tiers.disk import DiskOptions
from kvtier.tiers.dram import DramOptions
from kvtier.policies.lru import LRUPolicy
from kvtier.tiers.base import Tier
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.dram import DramTier

NOTE = ("bf16 Gaussian noise as data (KV-like, nearly incompressible): lz4 rows show codec cost, not gain; "
        "compression ratios on real KV blocks are in the codec benchmark.")
Row = dict[str, Any]


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else float("inf")


def best_time(run: Callable[[], None], reps: int, reset: Callable[[], object] | None = None) -> float:
    best = float("inf")
    for _ in range(reps):
        if reset is not None:
            reset()
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def make_blocks(size: int, count: int) -> list[bytes]:
    gen = torch.Generator().manual_seed(size)
    data = torch.randn(size * count // 2, generator=gen).to(torch.bfloat16).view(torch.uint8).numpy()
    return [data[i * size:(i + 1) * size].tobytes() for i in range(count)]


def drop_cache(paths: list[Path]) -> bool:
    """Evict files from the page cache (clean pages only, so sync first). False where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def read_files(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            f.read()


# ---- baselines ---------------------------------------------------------------------------------------------

def bench_baselines(blocks: list[bytes], workdir: Path, reps: int) -> dict[str, float]:
    size, total = len(blocks[0]), len(blocks[0]) * len(blocks)
    pool = np.ones(total, dtype=np.uint8)  # touched: no page faults in the timed loop
    srcs = [np.frombuffer(b, dtype=np.uint8) for b in blocks]

    def memcpy() -> None:
        for i, src in enumerate(srcs):
            np.copyto(pool[i * size:(i + 1) * size], src)

    def copy_out() -> None:
        view = pool.data
        for i in range(len(blocks)):
            bytes(view[i * size:(i + 1) * size])

    out = {"memcpy": mbps(total, best_time(memcpy, reps)), "bytes_copy": mbps(total, best_time(copy_out, reps))}
    ddir = workdir / "dd"
    ddir.mkdir(exist_ok=True)
    paths = [ddir / f"blk{i}" for i in range(len(blocks))]

    def fresh() -> None:  # every write rep creates new files, with no earlier dirty data in flight
        for path in paths:
            path.unlink(missing_ok=True)
        os.sync()

    for fsync in (False, True):
        def write(fsync: bool = fsync) -> None:
            for path, block in zip(paths, blocks):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, block)
                if fsync:
                    os.fsync(fd)
                os.close(fd)
        out["dd_write_fsync" if fsync else "dd_write"] = mbps(total, best_time(write, reps, fresh))
    out["dd_read_warm"] = mbps(total, best_time(lambda: read_files(paths), reps))
    if drop_cache(paths):
        out["dd_read_cold"] = mbps(total, best_time(lambda: read_files(paths), reps, lambda: drop_cache(paths)))
    shutil.rmtree(ddir)
    return out


# ---- tiers -------------------------------------------------------------------------------------------------

def tier_pass(tier: Tier, codec: BlockCodec, blocks: list[bytes], keys: list[bytes], reps: int) -> dict[str, float]:
    total = len(blocks[0]) * len(blocks)
    records = [codec.encode(k, b) for k, b in zip(keys, blocks)]

    def clear() -> None:
        for key in keys:
            tier.delete(key)
        if isinstance(tier, DiskTier):
            os.sync()  # as for dd: no earlier dirty data in flight when a timed write starts

    def put() -> None:
        for key, block in zip(keys, blocks):
            tier.put(key, codec.encode(key, block))

    def put_store() -> None:
        for key, record in zip(keys, records):
            tier.put(key, record)

    def get() -> None:
        for key in keys:
            rec = tier.get(key)
            assert rec is not None, "block missing from the benchmark tier"
            codec.decode(key, rec)

    def get_load() -> None:
        for key in keys:
            tier.get(key)

    put_store()  # warm-up: first touch of pool pages / directories, outside the timed loops
    assert len(tier) == len(keys), "benchmark tier too small: it evicted"
    page_overhead = tier.used_bytes / tier.record_bytes if isinstance(tier, DramTier) else 1.0
    out = {"put": mbps(total, best_time(put, reps, clear)),
           "get": mbps(total, best_time(get, reps)),
           "put_store_only": mbps(total, best_time(put_store, reps, clear)),
           "get_load_only": mbps(total, best_time(get_load, reps))}
    out["stored_ratio"] = total / sum(len(r) for r in records)
    out["page_overhead"] = page_overhead  # DRAM: bytes of pages taken per record byte (default page_size)
    if isinstance(tier, DiskTier):
        files = [tier.path_of(k) for k in keys]
        if drop_cache(files):
            out["get_cold"] = mbps(total, best_time(get, reps, lambda: drop_cache(files)))
    clear()
    return out


def make_tier(name: str, codec: BlockCodec, capacity: int, path: Path) -> Tier:
    if name == "dram":
        return DramTier(name, capacity, codec, LRUPolicy(), DramOptions())
    return DiskTier(name, capacity, codec, LRUPolicy(), DiskOptions(str(path), fsync=name == "disk+fsync"))


def bench_tiers(blocks: list[bytes], workdir: Path, reps: int) -> list[Row]:
    size = len(blocks[0])
    keys = [i.to_bytes(8, "little") * 2 for i in range(len(blocks))]
    room = 2 * len(blocks) * (size + HEADER_SIZE) + (4 << 20)  # everything fits, page rounding included
    rows: list[Row] = []
    for codec_name in ("none", "lz4"):
        codec = BlockCodec(CodecConfig(codec_name))
        for name in ("dram", "disk", "disk+fsync"):
            tier = make_tier(name, codec, room, workdir / "tier")
            result = tier_pass(tier, codec, blocks, keys, reps)
            extra = {"pinned": tier.pinned} if isinstance(tier, DramTier) else {}
            tier.close()
            rows.append({"size": size, "tier": name, "codec": codec_name, **extra, **result})
        shutil.rmtree(workdir / "tier", ignore_errors=True)
    return rows


def add_ratios(rows: list[Row], base: dict[str, float]) -> None:
    """Ratio of each tier figure to the baseline doing the same job on this machine, in this run."""
    for row in rows:
        if row["tier"] == "dram":
            pairs = {"put": "memcpy", "put_store_only": "memcpy", "get": "bytes_copy", "get_load_only": "bytes_copy"}
        else:
            write = "dd_write_fsync" if row["tier"] == "disk+fsync" else "dd_write"
            pairs = {"put": write, "put_store_only": write, "get": "dd_read_warm", "get_load_only": "dd_read_warm",
                     "get_cold": "dd_read_cold"}
        row["ratio"] = {op: {"vs": b, "x": round(row[op] / base[b], 3)}
                        for op, b in pairs.items() if op in row and b in base}


# ---- driver ------------------------------------------------------------------------------------------------

def fs_type(path: Path) -> str:
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype = line.split()[:3]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def print_size(size: int, base: dict[str, float], rows: list[Row]) -> None:
    print(f"\n== record size {size // 1024} KiB ==")
    print("  baselines MB/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in base.items()))
    print(f"  {'tier':<11}{'codec':<6}{'op':<15}{'MB/s':>10}  ratio vs baseline")
    for row in rows:
        for op in ("put", "put_store_only", "get", "get_load_only", "get_cold"):
            if op in row:
                r = row["ratio"].get(op)
                ratio = f"{r['x']:.2f}x {r['vs']}" if r else ""
                print(f"  {row['tier']:<11}{row['codec']:<6}{op:<15}{row[op]:>10,.0f}  {ratio}")
        if row["tier"] == "dram":
            print(f"  {'':<17}stored/raw {1 / row['stored_ratio']:.3f}, "
                  f"DRAM pages/record bytes {row['page_overhead']:.2f} (page_size {DramOptions().page_size // 1024} KiB)")


def parse_sizes(text: str) -> list[int]:
    units = {"k": 1024, "m": 1024 ** 2}
    out = []
    for part in text.lower().replace("ib", "").split(","):
        part = part.strip()
        out.append(int(float(part[:-1]) * units[part[-1]]) if part[-1] in units else int(part))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 MiB per case, one repetition")
    ap.add_argument("--sizes", default="512KiB,4MiB", help="record sizes, comma separated")
    ap.add_argument("--total-mib", type=int, default=256, help="bytes moved per case")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; the best is kept")
    ap.add_argument("--dir", default=None, help="where disk files go (default: a temp dir under the system temp)")
    ap.add_argument("--out", default="results/bench_tiers.json")
    args = ap.parse_args(argv)
    total, reps = (32, 1) if args.quick else (args.total_mib, args.reps)
    workdir = Path(tempfile.mkdtemp(prefix="kvtier-bench-", dir=args.dir))
    report: dict[str, Any] = {
        "note": NOTE, "unit": "MB/s of raw block bytes (1e6 B/s)", "quick": args.quick, "total_mib": total,
        "reps": reps, "machine": {"platform": platform.platform(), "python": platform.python_version(),
                                  "cpus": os.cpu_count(), "torch": torch.__version__,
                                  "cuda": torch.cuda.is_available(), "disk_dir": str(workdir),
                                  "disk_fs": fs_type(workdir)},
        "sizes": [],
    }
    print(NOTE)
    print(f"disk files under {workdir} ({report['machine']['disk_fs']}); {total} MiB per case, best of {reps}")
    try:
        for size in parse_sizes(args.sizes):
            blocks = make_blocks(size, max(4, total * 1024 * 1024 // size))
            base = bench_baselines(blocks, workdir, reps)
            rows = bench_tiers(blocks, workdir, reps)
            add_ratios(rows, base)
            print_size(size, base, rows)
            report["sizes"].append({"size": size, "blocks": len(blocks), "baselines": base, "tiers": rows})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nsaved {out}")
    return report


if __name__ == "__main__":
    main()
