"""``kvtier inspect`` and ``kvtier gc``: what a disk directory, S3 prefix or Redis holds, and pruning it.

Sources: ``--config FILE`` (every disk/s3/redis tier in it), ``--disk DIR``, ``--s3 s3://BUCKET/PREFIX``
(``--endpoint URL``, credentials from the AWS chain), ``--redis URL`` (``--prefix P``).

What a record can tell: its header holds the codec, the raw (decoded) size and the block key. The key is a
hash that folds in the model fingerprint, so the fingerprint itself cannot be read back. Blocks are grouped by
*namespace* (the disk directory, the S3 prefix before ``/hh/hash``, the Redis key prefix before ``:b:hash``,
which deployments usually name after the model), codec and raw block size (fixed by the model's KV layout and
vLLM's block size, so different models rarely share it).

Ages: disk = since the file was written (mtime), S3 = since the object was written (LastModified), Redis =
since the block was last read or written (OBJECT IDLETIME; unknown under an LFU maxmemory policy).

``gc`` removes corrupt records, then blocks older than ``--max-age``, then the oldest blocks until the rest
fit in ``--max-size``. A running kvtier that still lists a removed block sees a miss and recomputes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtier.codecs import ALL_DECODERS, HEADER_SIZE, read_header
from kvtier.codecs.record import FLAG_SHUFFLE
from kvtier.config import DiskOptions, KVTierConfig, RedisOptions, S3Options
from kvtier.errors import ConfigError, CorruptBlockError, KVTierError, TierError
from kvtier.units import format_size, parse_size

NOTE = ("records hold the block key (a hash that folds in the model fingerprint), not the fingerprint; blocks "
        "are grouped by namespace, codec and raw block size, which the model's KV layout and block size fix")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class Entry:
    """One stored block record."""

    name: str                 # file path, object key or Redis key
    namespace: str
    size: int                 # stored bytes
    age_s: float | None       # see the module docstring for what age means per source
    codec: str | None = None  # e.g. "lz4+shuffle"; None when the header is unreadable (corrupt)
    raw_size: int = 0


def describe_record(head: bytes, total_size: int) -> tuple[str, int]:
    """(codec label, raw size) from a record's first HEADER_SIZE bytes; raises CorruptBlockError."""
    if total_size < HEADER_SIZE or len(head) < HEADER_SIZE:
        raise CorruptBlockError(f"record of {total_size} bytes is shorter than its header")
    # read_header checks the stored length against the header's payload size: give it a record of that length
    # without fetching the payload (zeros after the header; the payload itself is not examined).
    padded = bytes(head[:HEADER_SIZE]) + bytes(total_size - HEADER_SIZE)
    codec_id, flags, _, raw_size, _, _, _ = read_header(padded)
    codec = ALL_DECODERS.get(codec_id)
    name = codec.name if codec is not None else f"codec{codec_id}"
    return name + ("+shuffle" if flags & FLAG_SHUFFLE else ""), raw_size


def _described(entry: Entry, head: bytes | None) -> Entry:
    if head is not None:
        try:
            entry.codec, entry.raw_size = describe_record(head, entry.size)
        except CorruptBlockError:
            pass
    return entry


# ---- disk -----------------------------------------------------------------------------------------------------

class DiskStore:
    kind = "disk"
    age_basis = "written"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.label = f"disk {self.root}"
        if not self.root.is_dir():
            raise TierError(f"{self.label}: not a directory")

    def entries(self) -> Iterator[Entry]:
        now = time.time()
        for sub in sorted(os.scandir(self.root), key=lambda d: d.name):
            if len(sub.name) != 2 or not sub.is_dir():
                continue
            for item in os.scandir(sub.path):
                stem = item.name[:-4] if item.name.endswith(".kvb") else ""
                if not _HEX32.fullmatch(stem) or not stem.startswith(sub.name):
                    continue  # temp files of writes in flight, anything else
                try:
                    st = item.stat()
                    with open(item.path, "rb") as f:
                        head = f.read(HEADER_SIZE)
                except FileNotFoundError:
                    continue  # removed since the listing
                entry = Entry(item.path, str(self.root), st.st_size, max(0.0, now - st.st_mtime))
                yield _described(entry, head)

    def delete(self, entries: Sequence[Entry]) -> None:
        for entry in entries:
            try:
                os.unlink(entry.name)
            except FileNotFoundError:
                pass


# ---- S3 -------------------------------------------------------------------------------------------------------

class S3Store:
    kind = "s3"
    age_basis = "written"

    def __init__(self, options: S3Options, prefix: str | None = None) -> None:
        from kvtier.tiers.s3 import make_s3_client
        from kvtier.tiers.shared import redact_url

        self.bucket = options.bucket
        if prefix is None:  # a tier's own prefix: exactly its objects, {prefix}/{hh}/{hash}
            prefix = options.prefix.strip("/") + "/" if options.prefix.strip("/") else ""
        self.prefix = prefix  # given on the command line: a plain S3 prefix, which may span namespaces
        self.label = f"s3 {redact_url(options.endpoint_url)}/{self.bucket}/{self.prefix}"
        self.client = make_s3_client(options)
        self.workers = max(1, options.max_concurrency)

    def _listing(self) -> Iterator[dict[str, Any]]:
        request: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix, "MaxKeys": 1000}
        while True:
            page = self._call("list", self.client.list_objects_v2, **request)
            yield from page.get("Contents", ())
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            request["ContinuationToken"] = token

    def _call(self, op: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError) as exc:  # the label names endpoint and bucket, never credentials
            raise TierError(f"{self.label}: {op} failed: {type(exc).__name__}: {exc}") from None

    def _head(self, item: dict[str, Any]) -> bytes | None:
        try:
            response = self._call("get", self.client.get_object, Bucket=self.bucket, Key=item["Key"],
                                  Range=f"bytes=0-{HEADER_SIZE - 1}")
            return bytes(response["Body"].read())
        except TierError:
            return None  # an unreadable object is reported as corrupt

    def entries(self) -> Iterator[Entry]:
        now = time.time()
        items = []
        for item in self._listing():
            key = str(item["Key"])
            namespace, _, name = key.rpartition("/")
            namespace, _, fan = namespace.rpartition("/")
            if _HEX32.fullmatch(name) and fan == name[:2]:
                items.append((item, namespace))
        with ThreadPoolExecutor(self.workers) as pool:
            heads = pool.map(self._head, [item for item, _ in items])
            for (item, namespace), head in zip(items, heads):
                age = now - item["LastModified"].timestamp() if item.get("LastModified") else None
                yield _described(Entry(str(item["Key"]), namespace, int(item["Size"]), age), head)

    def delete(self, entries: Sequence[Entry]) -> None:
        names = [e.name for e in entries]
        for start in range(0, len(names), 1000):
            batch = {"Objects": [{"Key": n} for n in names[start:start + 1000]], "Quiet": True}
            result = self._call("delete", self.client.delete_objects, Bucket=self.bucket, Delete=batch)
            if result.get("Errors"):
                first = result["Errors"][0]
                raise TierError(f"{self.label}: {len(result['Errors'])} deletes failed, first: "
                                f"{first.get('Key')}: {first.get('Code')}")


# ---- Redis ----------------------------------------------------------------------------------------------------

class RedisStore:
    kind = "redis"
    age_basis = "idle"

    def __init__(self, options: RedisOptions, exact: bool = True) -> None:
        from kvtier.tiers.redis import make_redis_client
        from kvtier.tiers.shared import redact_url

        self.prefix = options.key_prefix
        self.pattern = f"{self.prefix}:b:*" if exact else f"{self.prefix}*:b:*"
        self.label = f"redis {redact_url(options.url)} {self.pattern}"
        self.client = make_redis_client(options)

    def _call(self, op: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            return fn(*args, **kwargs)
        except (RedisError, OSError, TierError) as exc:  # the label shows the URL without credentials
            raise TierError(f"{self.label}: {op} failed: {type(exc).__name__}: {exc}") from None

    def entries(self) -> Iterator[Entry]:
        names = self._call("scan", list, self.client.scan_iter(match=self.pattern, count=1000))
        for start in range(0, len(names), 500):
            chunk = names[start:start + 500]
            pipe = self.client.pipeline(transaction=False)
            for name in chunk:  # IDLETIME first: GETRANGE counts as an access and would reset it
                pipe.object("idletime", name)
                pipe.strlen(name)
                pipe.getrange(name, 0, HEADER_SIZE - 1)
            replies = self._call("read", pipe.execute, raise_on_error=False)
            for i, raw_name in enumerate(chunk):
                idle, size, head = replies[3 * i:3 * i + 3]
                name = bytes(raw_name).decode(errors="replace")
                namespace, _, hexkey = name.rpartition(":b:")
                if not _HEX32.fullmatch(hexkey) or isinstance(size, Exception) or not size:
                    continue  # not a block, or gone since the scan
                age = float(idle) if isinstance(idle, int) else None
                head_bytes = bytes(head) if isinstance(head, bytes) else None
                yield _described(Entry(name, namespace, int(size), age), head_bytes)

    def delete(self, entries: Sequence[Entry]) -> None:
        from kvtier.tiers.redis import RedisPrefixIndex

        by_namespace: dict[str, list[Entry]] = {}
        for entry in entries:
            by_namespace.setdefault(entry.namespace, []).append(entry)
        for namespace, group in by_namespace.items():
            for start in range(0, len(group), 500):
                chunk = group[start:start + 500]
                self._call("delete", self.client.delete, *[e.name for e in chunk])
                keys = [bytes.fromhex(e.name.rpartition(":b:")[2]) for e in chunk]
                # Drop them from the shared index too, if that namespace keeps one (a no-op otherwise).
                self._call("index update", RedisPrefixIndex(self.client, namespace).remove, keys)


Store = DiskStore | S3Store | RedisStore  # each has label, kind, age_basis, entries() and delete(entries)


# ---- reports --------------------------------------------------------------------------------------------------

@dataclass
class Group:
    blocks: int = 0
    bytes: int = 0
    raw_bytes: int = 0
    ages: list[float] = field(default_factory=list)

    def add(self, entry: Entry) -> None:
        self.blocks += 1
        self.bytes += entry.size
        self.raw_bytes += entry.raw_size
        if entry.age_s is not None:
            self.ages.append(entry.age_s)

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "bytes": self.bytes, "raw_bytes": self.raw_bytes,
                "oldest_age_s": round(max(self.ages), 3) if self.ages else None,
                "newest_age_s": round(min(self.ages), 3) if self.ages else None}


def summarize(store: Store, entries: Sequence[Entry]) -> dict[str, Any]:
    total, corrupt = Group(), Group()
    codecs: dict[str, Group] = {}
    groups: dict[tuple[str, str, int], Group] = {}
    for entry in entries:
        if entry.codec is None:
            corrupt.add(entry)
            continue
        total.add(entry)
        codecs.setdefault(entry.codec, Group()).add(entry)
        groups.setdefault((entry.namespace, entry.codec, entry.raw_size), Group()).add(entry)
    return {
        "source": store.label, "kind": store.kind, "age_basis": store.age_basis, **total.to_dict(),
        "corrupt_blocks": corrupt.blocks, "corrupt_bytes": corrupt.bytes,
        "codecs": {name: g.to_dict() for name, g in sorted(codecs.items())},
        "groups": [{"namespace": ns, "codec": codec, "raw_block_bytes": raw, **g.to_dict()}
                   for (ns, codec, raw), g in sorted(groups.items())],
        "note": NOTE,
    }


def plan_gc(entries: Sequence[Entry], max_age_s: float | None, max_bytes: int | None) -> list[Entry]:
    """Corrupt records, then records older than ``max_age_s``, then the oldest until ``max_bytes`` is met.

    Blocks of unknown age are removed by size only, after every block of known age.
    """
    victims = [e for e in entries if e.codec is None]
    keep = [e for e in entries if e.codec is not None]
    if max_age_s is not None:
        victims += [e for e in keep if e.age_s is not None and e.age_s > max_age_s]
        keep = [e for e in keep if e.age_s is None or e.age_s <= max_age_s]
    if max_bytes is not None:
        keep.sort(key=lambda e: (e.age_s is not None, e.age_s or 0.0), reverse=True)  # oldest first
        used = sum(e.size for e in keep)
        while keep and used > max_bytes:
            entry = keep.pop(0)
            used -= entry.size
            victims.append(entry)
    return victims


def parse_duration(text: str) -> float:
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"--max-age: expected a duration like 90s, 30m, 12h, 7d or 2w, got {text!r}")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def print_summary(report: dict[str, Any]) -> None:
    ratio = report["raw_bytes"] / report["bytes"] if report["bytes"] else 0.0
    print(f"{report['source']}: {report['blocks']} blocks, {format_size(report['bytes'])} stored "
          f"({format_size(report['raw_bytes'])} raw, {ratio:.2f}x), ages {_age(report['newest_age_s'])}"
          f"..{_age(report['oldest_age_s'])} ({report['age_basis']}), {report['corrupt_blocks']} corrupt")
    if report["groups"]:
        print(f"  {'namespace':<32} {'codec':<14} {'raw block':>10} {'blocks':>8} {'stored':>10} {'oldest':>8}")
    for g in report["groups"]:
        print(f"  {g['namespace'][-32:]:<32} {g['codec']:<14} {format_size(g['raw_block_bytes']):>10} "
              f"{g['blocks']:>8} {format_size(g['bytes']):>10} {_age(g['oldest_age_s']):>8}")


# ---- command line ---------------------------------------------------------------------------------------------

def open_stores(args: argparse.Namespace) -> list[Store]:
    if args.disk:
        return [DiskStore(args.disk)]
    if args.s3:
        bucket, _, prefix = args.s3.removeprefix("s3://").partition("/")
        if len(bucket) < 3:
            raise ConfigError(f"--s3: expected s3://BUCKET[/PREFIX], got {args.s3!r}")
        return [S3Store(S3Options(bucket=bucket, prefix="", endpoint_url=args.endpoint, region=args.region or
                                  "us-east-1", addressing_style="path" if args.endpoint else "auto"), prefix)]
    if args.redis:
        return [RedisStore(RedisOptions(url=args.redis, key_prefix=args.prefix), exact=False)]
    cfg = KVTierConfig.from_yaml(args.config)
    stores: list[Store] = []
    for tier in cfg.tiers:
        if isinstance(tier.options, DiskOptions):
            stores.append(DiskStore(tier.options.path))
        elif isinstance(tier.options, S3Options):
            stores.append(S3Store(tier.options))
        elif isinstance(tier.options, RedisOptions):
            stores.append(RedisStore(tier.options))
        else:
            print(f"{tier.name}: DRAM lives inside the engine process; nothing to inspect", file=sys.stderr)
    return stores


def build_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"kvtier {command}", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a kvtier config: every disk, s3 and redis tier in it")
    source.add_argument("--disk", help="a disk tier directory")
    source.add_argument("--s3", help="s3://BUCKET[/PREFIX] (credentials from the AWS chain)")
    source.add_argument("--redis", help="redis://[:password@]host:port/db")
    parser.add_argument("--endpoint", help="S3 endpoint URL (SeaweedFS, MinIO); omit for AWS")
    parser.add_argument("--region", help="S3 region (default us-east-1)")
    parser.add_argument("--prefix", default="kvtier", help="Redis key prefix to match (default kvtier)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    if command == "gc":
        parser.add_argument("--max-age", help="remove blocks older than this (90s, 30m, 12h, 7d, 2w)")
        parser.add_argument("--max-size", help="then remove the oldest until this much is left (10GiB)")
        parser.add_argument("--dry-run", action="store_true", help="report what would be removed")
    return parser


def run_gc(store: Store, entries: list[Entry], args: argparse.Namespace, max_bytes: int | None) -> dict[str, Any]:
    max_age = parse_duration(args.max_age) if args.max_age else None
    victims = plan_gc(entries, max_age, max_bytes)
    if victims and not args.dry_run:
        store.delete(victims)
    removed = sum(e.size for e in victims)
    return {"source": store.label, "kind": store.kind, "dry_run": bool(args.dry_run),
            "removed_blocks": len(victims), "removed_bytes": removed,
            "corrupt_removed": sum(1 for e in victims if e.codec is None),
            "kept_blocks": len(entries) - len(victims), "kept_bytes": sum(e.size for e in entries) - removed}


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "inspect"
    args = build_parser(command).parse_args(argv[1:])
    max_bytes = None
    if command == "gc":
        if not args.max_age and not args.max_size:
            raise ConfigError("gc: give --max-age, --max-size or both")
        if args.max_size:
            try:
                max_bytes = parse_size(args.max_size)
            except ValueError as exc:
                raise ConfigError(f"--max-size: {exc}, got {args.max_size!r}") from None
    reports = []
    for store in open_stores(args):
        entries = list(store.entries())
        report = run_gc(store, entries, args, max_bytes) if command == "gc" else summarize(store, entries)
        reports.append(report)
        if not args.json:
            if command == "gc":
                verb = "would remove" if report["dry_run"] else "removed"
                print(f"{report['source']}: {verb} {report['removed_blocks']} blocks "
                      f"({format_size(report['removed_bytes'])}, {report['corrupt_removed']} corrupt); kept "
                      f"{report['kept_blocks']} ({format_size(report['kept_bytes'])})")
            else:
                print_summary(report)
    if args.json:
        print(json.dumps({"command": command, "sources": reports}, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:] or ["inspect", "--help"]))
    except KVTierError as exc:
        print(f"kvtier: error: {exc}", file=sys.stderr)
        sys.exit(2)
