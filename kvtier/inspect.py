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
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtier.codecs import HEADER_SIZE, codec_name, parse_header
from kvtier.config import KVTierConfig
from kvtier.errors import ConfigError, CorruptBlockError, KVTierError, TierError
from kvtier.tiers.base import StoredBlock, Tier
from kvtier.tiers.factory import make_tier
from kvtier.units import format_size, parse_size

NOTE = ("records hold the block key (a hash that folds in the model fingerprint), not the fingerprint; blocks "
        "are grouped by namespace, codec and raw block size, which the model's KV layout and block size fix")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
AGE_BASIS = {"redis": "idle"}  # what an entry's age means: since written (disk, S3) or last used (Redis)


@dataclass
class Entry:
    """One stored block record."""

    name: str                 # file path, object key or Redis key
    namespace: str
    size: int                 # stored bytes
    age_s: float | None       # see the module docstring for what age means per source
    codec: str | None = None  # e.g. "lz4+shuffle"; None when the header is unreadable (corrupt)
    raw_size: int = 0
    block: StoredBlock | None = None  # what the tier listed, for removal


def describe_record(head: bytes, total_size: int) -> tuple[str, int]:
    """(codec label, raw size) from a record's first HEADER_SIZE bytes; raises CorruptBlockError."""
    header = parse_header(head, total_size)
    return codec_name(header.codec_id) + ("+shuffle" if header.shuffled else ""), header.raw_size


@dataclass
class Source:
    """A tier's storage to inspect: its own namespace, or a wider ``scope`` (an S3 or Redis key prefix)."""

    tier: Tier
    scope: str | None = None

    @property
    def label(self) -> str:
        return f"{self.tier.kind} {self.tier.location(self.scope)}"

    @property
    def kind(self) -> str:
        return self.tier.kind

    @property
    def age_basis(self) -> str:
        return AGE_BASIS.get(self.tier.kind, "written")

    def entries(self) -> Iterator[Entry]:
        listed = list(self.tier.entries(self.scope))
        for start in range(0, len(listed), 1000):
            chunk = listed[start:start + 1000]
            for block, head in zip(chunk, self.tier.read_heads(chunk, HEADER_SIZE)):
                entry = Entry(block.name, block.namespace, block.size, block.age_s, block=block)
                if head is not None:
                    try:
                        entry.codec, entry.raw_size = describe_record(head, block.size)
                    except CorruptBlockError:
                        pass
                yield entry

    def delete(self, entries: Sequence[Entry]) -> None:
        self.tier.remove([e.block for e in entries if e.block is not None])

    def close(self) -> None:
        self.tier.close()


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


def summarize(store: Source, entries: Sequence[Entry]) -> dict[str, Any]:
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

def open_tier(kind: str, options: dict[str, Any], label: str) -> Tier:
    """A tier of ``kind`` over existing storage, unbounded and with no eviction (inspect and gc only read and
    delete what is listed)."""
    cfg = KVTierConfig.from_dict({"tiers": [{"kind": kind, "capacity": 0, "codec": "none", **options}]}, env={})
    try:
        return make_tier(cfg.tiers[0], path=label)
    except TierError as exc:
        raise TierError(f"{label}: {exc}") from None


def open_stores(args: argparse.Namespace) -> list[Source]:
    if args.disk:
        if not Path(args.disk).is_dir():
            raise TierError(f"disk {args.disk}: not a directory")
        return [Source(open_tier("disk", {"path": args.disk}, "--disk"))]
    if args.s3:
        bucket, _, prefix = args.s3.removeprefix("s3://").partition("/")
        if len(bucket) < 3:
            raise ConfigError(f"--s3: expected s3://BUCKET[/PREFIX], got {args.s3!r}")
        options = {"bucket": bucket, "prefix": "", "endpoint_url": args.endpoint, "region": args.region or "us-east-1",
                   "addressing_style": "path" if args.endpoint else "auto"}
        return [Source(open_tier("s3", options, "--s3"), scope=prefix)]
    if args.redis:
        return [Source(open_tier("redis", {"url": args.redis, "key_prefix": args.prefix}, "--redis"),
                       scope=args.prefix)]
    cfg = KVTierConfig.from_yaml(args.config)
    stores: list[Source] = []
    for i, tier_cfg in enumerate(cfg.tiers):
        tier = make_tier(tier_cfg, cfg.checksum, f"tiers[{i}]")
        if not tier.persistent:
            tier.close()
            print(f"{tier_cfg.name}: {tier_cfg.kind} lives inside the engine process; nothing to inspect",
                  file=sys.stderr)
            continue
        stores.append(Source(tier))
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


def run_gc(store: Source, entries: list[Entry], args: argparse.Namespace, max_bytes: int | None) -> dict[str, Any]:
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
        try:
            entries = list(store.entries())
            report = run_gc(store, entries, args, max_bytes) if command == "gc" else summarize(store, entries)
        finally:
            store.close()
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
