"""Fault audit: kvtier's tiers under hostile and faulty storage, counted. Real redis-server and SeaweedFS,
started here on 127.0.0.1; kvtier's own classes, no engine.

For each case: operations, wrong reads (bytes served that differ from what was stored), escaped exceptions,
blocks lost (stored, then neither served nor reported gone), the worst stall of one operation, and the growth
of peak RSS. The scenarios are those of tests/test_integrity.py and tests/test_faults.py, run in bulk.

    python benchmarks/fault_audit.py [--reads 200] [--out benchmarks/results/fault_audit.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from servers import S3_BUCKET, RedisServer, SeaweedServer, find_weed  # noqa: E402
from test_integrity import BLOCK, disk_spec, forged_huge, plant, present, redis_spec, s3_spec, stack_over  # noqa: E402

from kvtier.codecs import BlockCodec, ZstdCodec, encode_record  # noqa: E402
from kvtier.config import CodecConfig  # noqa: E402


class Tally:
    def __init__(self, case: str) -> None:
        self.row: dict[str, Any] = {"case": case, "operations": 0, "wrong_reads": 0, "escaped_exceptions": 0,
                                    "blocks_lost": 0, "worst_stall_ms": 0.0}
        self._rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def op(self, fn: Callable[[], Any], expect: Any = None, check: bool = True) -> Any:
        self.row["operations"] += 1
        start = time.perf_counter()
        try:
            got = fn()
        except Exception as exc:  # the very thing counted here
            self.row["escaped_exceptions"] += 1
            self.row.setdefault("exceptions", []).append(f"{type(exc).__name__}: {exc}"[:120])
            got = None
        self.row["worst_stall_ms"] = max(self.row["worst_stall_ms"], round((time.perf_counter() - start) * 1000, 1))
        if check and got is not None and got != expect:
            self.row["wrong_reads"] += 1
        return got

    def rebase(self) -> None:
        self._rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def done(self) -> dict[str, Any]:
        self.row["rss_growth_mib"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._rss) / 1024, 1)
        return self.row


def hostile_records(spec: dict[str, Any], kind: str, reads: int) -> list[dict[str, Any]]:
    rows = []
    for name, make in (("forged header claiming 2^40 raw bytes (lz4, zstd)", _forged),
                       ("record forged with a valid checksum, tier with a key", _unsigned),
                       ("object 64 MiB where a record is 33 KiB", _huge),
                       ("valid zstd record that decodes to 64 MiB", _bomb)):
        auth = name.startswith("record forged")
        stack = stack_over(spec, env={"KVTIER_AUTH_KEY": "audit-key-0123456789abcdef"} if auth else None,
                           **({"auth": {"tiers": "all"}} if auth else {}))
        tally = Tally(f"{kind}: {name}")
        good = {bytes([i]) * 16: os.urandom(BLOCK) for i in range(8)}
        for key, raw in good.items():
            stack.put(key, raw)
        for i in range(reads):
            bad = f"bad-{i // 20}".encode().ljust(16, b".")
            if i % 20 == 0:  # a hostile record, read 20 times: refused (and deleted) the first time, absent after
                plant(stack, bad, make(bad))
                if i == 0:  # building and planting it is not the reader's memory: measure from here
                    tally.rebase()
            tally.op(lambda k=bad: stack.get(k), expect=None)
            key = list(good)[i % len(good)]
            got = tally.op(lambda k=key: stack.get(k), check=False)
            if got is None:
                tally.row["blocks_lost"] += 1
            elif got[0] != good[key]:
                tally.row["wrong_reads"] += 1
        rows.append(tally.done())
        stack.close()
    return rows


def _forged(key: bytes) -> bytes:
    return forged_huge(key, 1 if key[-1] % 2 else 2, b"\x00" * 64)


def _unsigned(key: bytes) -> bytes:
    return BlockCodec(CodecConfig("none")).encode(key, os.urandom(BLOCK))


def _huge(key: bytes) -> bytes:
    return os.urandom(1024) * (64 * 1024)


def _bomb(key: bytes) -> bytes:
    return encode_record(key, bytes(64 << 20), ZstdCodec(3))


def phantoms(spec: dict[str, Any], kind: str, rounds: int) -> dict[str, Any]:
    stack = stack_over(spec)
    tier: Any = stack.tiers[0]
    tally = Tally(f"{kind}: reads racing deletes ({rounds} rounds)")
    for i in range(rounds):
        key = f"race-{i}".encode().ljust(16, b".")
        tally.op(lambda k=key: tier.put(k, tier.codec.encode(k, os.urandom(1024))), check=False)
        reader = threading.Thread(target=tier.get, args=(key,))
        reader.start()
        tally.op(lambda k=key: tier.delete(k), check=False)
        reader.join()
        if tier.contains(key) and not present(stack, key):
            tally.row["blocks_lost"] += 1  # a phantom: demotion would skip a block that is not there
    stack.close()
    return tally.done()


def hung_server(server: Any, spec: dict[str, Any], kind: str) -> dict[str, Any]:
    stack = stack_over(spec)
    stack.tiers[0].breaker.initial_s = 0.5  # type: ignore[attr-defined]
    keys = [bytes([i]) * 16 for i in range(16)]
    for key in keys:
        stack.put(key, os.urandom(BLOCK))
    tally = Tally(f"{kind}: server frozen (SIGSTOP) for 5 s, loads every 100 ms")
    server.proc.send_signal(signal.SIGSTOP)
    try:
        end = time.monotonic() + 5
        while time.monotonic() < end:
            tally.op(lambda: stack.get_many(keys), check=False)
            time.sleep(0.1)
    finally:
        server.proc.send_signal(signal.SIGCONT)
    stack.close()
    return tally.done()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fault_audit.json"))
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kvtier-audit-") as tmp:
        redis_srv = RedisServer(Path(tmp))
        redis_srv.start()
        (Path(tmp) / "weed").mkdir()
        weed = SeaweedServer(Path(tmp) / "weed", find_weed() or "weed")
        weed.start(timeout_s=60)
        weed.ensure_bucket(S3_BUCKET)
        try:
            specs = {"disk": disk_spec(Path(tmp) / "disk"), "s3": s3_spec(weed), "redis": redis_spec(redis_srv)}
            for kind, spec in specs.items():
                rows += hostile_records(spec, kind, args.reads)
            for kind in ("s3", "redis"):
                rows.append(phantoms(specs[kind], kind, 300))
                rows.append(hung_server(weed if kind == "s3" else redis_srv, specs[kind], kind))
        finally:
            weed.stop()
            redis_srv.stop()
    report = {"command": "python benchmarks/fault_audit.py " + " ".join(argv or sys.argv[1:]),
              "loadavg": os.getloadavg(), "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print("| case | operations | wrong reads | escaped exceptions | blocks lost | worst stall ms | RSS growth MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['operations']} | {r['wrong_reads']} | {r['escaped_exceptions']} | "
              f"{r['blocks_lost']} | {r['worst_stall_ms']} | {r['rss_growth_mib']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
