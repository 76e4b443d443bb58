"""The shared placement index (kvtier/sharing.py) at scale, on a real redis-server started here on 127.0.0.1.

Measures what the README's "sharing at scale" section extrapolates from:
  lookup    latency of one scheduler lookup (one pipelined HMGET per shared tier) for a request of B blocks
            x R ranks, with N entries already in the index; p50 / p99 / max over many lookups
  memory    Redis memory per index entry (INFO used_memory before/after N entries), so RAM for 10^8 blocks
  publish   index updates per second one engine's publisher pushes (batched pipelines)
  s3        SeaweedFS PUT and GET latency of one block record (an S3 request per block saved or loaded)

    python benchmarks/bench_placement_index.py [--entries 1000000] [--out benchmarks/results/placement_index.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import redis  # noqa: E402
from servers import S3_BUCKET, RedisServer, SeaweedServer, find_weed  # noqa: E402

from kvtier.config import PlacementIndexConfig  # noqa: E402
from kvtier.keys import rank_key  # noqa: E402
from kvtier.sharing import SharedPlacement  # noqa: E402


def fill(client: redis.Redis, prefix: str, entries: int) -> float:
    """Write ``entries`` index entries (16-byte keys, sizes) into one tier's hash; returns seconds."""
    start = time.perf_counter()
    name = f"{prefix}:index:s3"
    for base in range(0, entries, 10000):
        pipe = client.pipeline(transaction=False)
        pipe.hset(name, mapping={os.urandom(16): 790000 for _ in range(min(10000, entries - base))})
        pipe.execute()
    return time.perf_counter() - start


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": round(ordered[len(ordered) // 2] * 1000, 3),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 3),
            "max_ms": round(ordered[-1] * 1000, 3), "n": len(ordered)}


def lookups(placement: SharedPlacement, known: list[bytes], blocks: int, ranks: int, rounds: int) -> dict[str, Any]:
    samples = []
    for i in range(rounds):
        keys = [rank_key(k, r, ranks) for k in known[i % 50:i % 50 + blocks] for r in range(ranks)]
        start = time.perf_counter()
        placement.lookup(keys)
        samples.append(time.perf_counter() - start)
    return {"blocks": blocks, "ranks": ranks, **percentiles(samples)}


def s3_latency(workdir: Path, rounds: int) -> dict[str, Any]:
    weed = find_weed()
    if weed is None:
        return {"skipped": "no weed binary"}
    workdir.mkdir(parents=True, exist_ok=True)
    server = SeaweedServer(workdir, weed)
    server.start(timeout_s=60)
    try:
        server.ensure_bucket(S3_BUCKET)
        client: Any = server.boto_client()
        body = os.urandom(790000)  # a ~96M-model block of 128 tokens, compressed
        puts, gets = [], []
        for i in range(rounds):
            start = time.perf_counter()
            client.put_object(Bucket=S3_BUCKET, Key=f"lat/{i}", Body=body)
            puts.append(time.perf_counter() - start)
            start = time.perf_counter()
            client.get_object(Bucket=S3_BUCKET, Key=f"lat/{i}")["Body"].read()
            gets.append(time.perf_counter() - start)
        return {"object_bytes": len(body), "put": percentiles(puts), "get": percentiles(gets)}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "placement_index.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-") as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            client = redis.Redis.from_url(server.url)
            before = int(client.info("memory")["used_memory"])
            fill_s = fill(client, "bench", args.entries)
            per_entry = (int(client.info("memory")["used_memory"]) - before) / args.entries
            known = [os.urandom(16) for _ in range(200)]
            client.hset("bench:index:s3", mapping={rank_key(k, r, ranks): 790000 for k in known
                                                  for ranks in (1, 2, 8) for r in range(ranks)})
            placement = SharedPlacement(PlacementIndexConfig(url=server.url, key_prefix="bench"), ["s3"])
            results = [lookups(placement, known, blocks, ranks, args.rounds)
                       for blocks, ranks in ((16, 1), (64, 1), (16, 8), (128, 8))]
            start = time.perf_counter()
            updates = [("add", os.urandom(16), "s3", 790000) for _ in range(200_000)]
            for i in range(0, len(updates), 512):
                placement.publish(updates[i:i + 512])
            publish_rate = len(updates) / (time.perf_counter() - start)
        finally:
            server.stop()
        s3 = s3_latency(Path(tmp) / "weed", min(args.rounds, 300))
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "loadavg": os.getloadavg()},
              "command": "python benchmarks/bench_placement_index.py " + " ".join(argv or sys.argv[1:]),
              "entries": args.entries, "fill_s": round(fill_s, 2), "redis_bytes_per_entry": round(per_entry, 1),
              "lookup": results, "publish_updates_per_s": round(publish_rate), "s3": s3}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
