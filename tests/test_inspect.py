"""`kvtier inspect` / `kvtier gc` on a real disk directory written by DiskTier, a real redis-server and
SeaweedFS (`weed mini`), narrated step by step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from servers import S3_BUCKET

from kvtier.config import KVTierConfig
from kvtier.errors import ConfigError, CorruptBlockError, TierError
from kvtier.inspect import Entry, describe_record, parse_duration, plan_gc
from kvtier.inspect import main as inspect_main
from kvtier.tiers.base import Tier
from kvtier.tiers.factory import make_tier
from kvtier.tiers.redis import RedisPrefixIndex

DAY = 86400.0


def tier_from(spec: dict[str, Any]) -> Tier:
    cfg = KVTierConfig.from_dict({"tiers": [spec]}, env={})
    tier = make_tier(cfg.tiers[0])
    tier.load_existing()
    return tier


def block(i: int, size: int) -> bytes:
    """Compressible but distinct bytes, like KV values."""
    return (i.to_bytes(4, "little") * (size // 8)) + os.urandom(size - 4 * (size // 8))


def key(model: int, i: int) -> bytes:
    return bytes([model]) * 8 + i.to_bytes(8, "little")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    """Run `kvtier inspect|gc ARGS`; return its parsed --json output (or the text)."""
    assert inspect_main(list(argv)) == 0
    out = capsys.readouterr().out
    return json.loads(out) if "--json" in argv else out


def fill_disk(root: Path) -> dict[str, list[bytes]]:
    """Two "models" in one directory: 8 blocks of 16 KiB with lz4+shuffle, 4 of 8 KiB with zstd. Model A's
    first 4 blocks were written 10 days ago, the rest one hour ago; one corrupt record; one temp file."""
    a = tier_from({"kind": "disk", "capacity": "1MiB", "path": str(root), "codec": {"name": "lz4", "shuffle": True}})
    b = tier_from({"kind": "disk", "capacity": "1MiB", "path": str(root), "codec": "zstd"})
    keys = {"a": [key(1, i) for i in range(8)], "b": [key(2, i) for i in range(4)]}
    for i, k in enumerate(keys["a"]):
        a.put(k, a.codec.encode(k, block(i, 16384)))
    for i, k in enumerate(keys["b"]):
        b.put(k, b.codec.encode(k, block(i, 8192)))
    now = time.time()
    for i, k in enumerate(keys["a"]):
        age = 10 * DAY + i if i < 4 else 3600 + i
        os.utime(a.path_of(k), (now - age, now - age))
    for k in keys["b"]:
        os.utime(b.path_of(k), (now - 60, now - 60))
    bad = a.path_of(key(3, 0))
    bad.parent.mkdir(exist_ok=True)
    bad.write_bytes(b"not a kvtier record at all" * 10)
    (bad.parent / f".{bad.stem}.123.tmp").write_bytes(b"half a write")
    return keys


def stored_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.glob("*/*.kvb"))


# ---- disk -----------------------------------------------------------------------------------------------------

def test_inspect_disk_reports_blocks_codecs_layouts_and_ages(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "disk"
    fill_disk(root)
    report = run(capsys, "inspect", "--disk", str(root), "--json")
    assert report["command"] == "inspect"
    [src] = report["sources"]
    # 12 good records; the corrupt one is counted apart; the temp file is not a record.
    assert (src["blocks"], src["corrupt_blocks"]) == (12, 1)
    assert src["bytes"] + src["corrupt_bytes"] == stored_bytes(root)
    assert src["raw_bytes"] == 8 * 16384 + 4 * 8192
    assert set(src["codecs"]) == {"lz4+shuffle", "zstd"}
    assert src["codecs"]["zstd"]["blocks"] == 4
    # Grouped by what a record header tells: codec and raw block size (one group per "model" here).
    groups = {(g["codec"], g["raw_block_bytes"]): g["blocks"] for g in src["groups"]}
    assert groups == {("lz4+shuffle", 16384): 8, ("zstd", 8192): 4}
    assert 10 * DAY < src["oldest_age_s"] < 10 * DAY + 60 and 55 < src["newest_age_s"] < 120
    assert src["age_basis"] == "written" and "fingerprint" in src["note"]
    # The text form says the same in a line per group.
    text = run(capsys, "inspect", "--disk", str(root))
    assert "12 blocks" in text and "1 corrupt" in text and "lz4+shuffle" in text


def test_gc_disk_by_age_then_size_oldest_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "disk"
    keys = fill_disk(root)
    before = stored_bytes(root)
    # 1. A dry run reports and removes nothing.
    dry = run(capsys, "gc", "--disk", str(root), "--max-age", "7d", "--dry-run", "--json")
    assert dry["sources"][0]["removed_blocks"] == 5 and dry["sources"][0]["dry_run"]
    assert stored_bytes(root) == before
    # 2. --max-age 7d removes model A's four 10-day-old blocks and the corrupt record.
    done = run(capsys, "gc", "--disk", str(root), "--max-age", "7d", "--json")
    [src] = done["sources"]
    assert (src["removed_blocks"], src["corrupt_removed"], src["kept_blocks"]) == (5, 1, 8)
    assert src["kept_bytes"] == stored_bytes(root)
    left = {p.stem for p in root.glob("*/*.kvb")}
    assert left == {k.hex() for k in keys["a"][4:] + keys["b"]}
    # 3. --max-size below what is left removes the oldest first: model A's a[7], a[6], a[5] (3607..3605 s),
    #    keeping a[4] (3604 s) and model B's blocks (60 s).
    sizes = {p.stem: p.stat().st_size for p in root.glob("*/*.kvb")}
    limit = sum(sizes[k.hex()] for k in keys["b"]) + sizes[keys["a"][4].hex()]
    done = run(capsys, "gc", "--disk", str(root), "--max-size", str(limit), "--json")
    assert done["sources"][0]["removed_blocks"] == 3
    assert {p.stem for p in root.glob("*/*.kvb")} == {k.hex() for k in [keys["a"][4], *keys["b"]]}
    # 4. What is left is intact: a DiskTier restarted on the directory serves it.
    tier = tier_from({"kind": "disk", "capacity": "1MiB", "path": str(root), "codec": "zstd"})
    for k in keys["b"]:
        record = tier.get(k)
        assert record is not None and len(tier.codec.decode(k, record)) == 8192  # decode verifies the checksum


def test_gc_needs_a_limit_and_reads_durations(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match="--max-age, --max-size"):
        inspect_main(["gc", "--disk", str(tmp_path / "d")])
    with pytest.raises(ConfigError, match="duration"):
        inspect_main(["gc", "--disk", str(tmp_path / "d"), "--max-age", "soon"])
    with pytest.raises(TierError, match="not a directory"):
        inspect_main(["inspect", "--disk", str(tmp_path / "missing")])
    assert [parse_duration(t) for t in ("90", "90s", "30m", "12h", "7d", "2w")] == \
        [90, 90, 1800, 43200, 7 * DAY, 14 * DAY]


def test_module_entry_point_reports_errors_with_exit_code_2(tmp_path: Path) -> None:
    run_module = [sys.executable, "-m", "kvtier.inspect", "gc", "--disk", str(tmp_path), "--max-size", "lots"]
    done = subprocess.run(run_module, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "--max-size: expected a size" in done.stderr
    done = subprocess.run(run_module[:-2] + ["--max-size", "1GiB"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0 and "removed 0 blocks" in done.stdout


def test_plan_gc_orders_by_age_and_keeps_unknown_ages_for_last() -> None:
    entries = [Entry("a", "", 100, 50.0, "lz4"), Entry("b", "", 100, 10.0, "lz4"), Entry("c", "", 100, None, "lz4"),
               Entry("d", "", 100, 99.0, None), Entry("e", "", 100, 70.0, "lz4")]
    assert [e.name for e in plan_gc(entries, 60.0, None)] == ["d", "e"]
    assert [e.name for e in plan_gc(entries, None, 150)] == ["d", "e", "a", "b"]
    assert [e.name for e in plan_gc(entries, None, 50)] == ["d", "e", "a", "b", "c"]


def test_describe_record_reads_only_the_header() -> None:
    tier_codec = tier_from({"kind": "dram", "capacity": "64KiB", "codec": {"name": "zstd", "shuffle": True},
                            "pin_memory": "never"}).codec
    record = tier_codec.encode(key(1, 1), block(1, 4096))
    assert describe_record(record[:64], len(record)) == ("zstd+shuffle", 4096)
    with pytest.raises(CorruptBlockError):
        describe_record(record[:64], len(record) + 1)  # the header's payload size disagrees


# ---- Redis ----------------------------------------------------------------------------------------------------

def redis_tier(url: str, prefix: str, codec: str = "lz4") -> Tier:
    return tier_from({"kind": "redis", "capacity": 0, "url": url, "key_prefix": prefix, "codec": codec,
                      "shared_index": True})


def test_inspect_and_gc_redis(redis_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = redis_server.url
    # 1. Two namespaces ("models") under one prefix, as two deployments would write them.
    a, b = redis_tier(url, "insp:model-a"), redis_tier(url, "insp:model-b", "zstd")
    for i in range(6):
        a.put(key(1, i), a.codec.encode(key(1, i), block(i, 16384)))
    for i in range(3):
        b.put(key(2, i), b.codec.encode(key(2, i), block(i, 8192)))
    client = redis.Redis.from_url(url)
    client.set("insp:model-a:b:" + "ab" * 16, b"garbage")  # a corrupt record
    client.set("insp:model-a:other", b"not a block")
    # 2. inspect groups them by namespace, codec and raw size; Redis ages are idle times.
    report = run(capsys, "inspect", "--redis", url, "--prefix", "insp:", "--json")
    [src] = report["sources"]
    assert (src["blocks"], src["corrupt_blocks"], src["age_basis"]) == (9, 1, "idle")
    groups = {(g["namespace"], g["codec"], g["raw_block_bytes"]): g["blocks"] for g in src["groups"]}
    assert groups == {("insp:model-a", "lz4", 16384): 6, ("insp:model-b", "zstd", 8192): 3}
    assert src["oldest_age_s"] is not None and src["oldest_age_s"] < 60
    # 3. gc --max-size: the corrupt record goes, then blocks until the rest fit; the shared index follows.
    limit = src["groups"][1]["bytes"] + 2 * (src["groups"][0]["bytes"] // 6)
    done = run(capsys, "gc", "--redis", url, "--prefix", "insp:", "--max-size", str(limit), "--json")
    [gc] = done["sources"]
    assert gc["corrupt_removed"] == 1 and gc["kept_bytes"] <= limit and gc["removed_blocks"] >= 5
    after = run(capsys, "inspect", "--redis", url, "--prefix", "insp:", "--json")
    assert after["sources"][0]["blocks"] == gc["kept_blocks"] and after["sources"][0]["bytes"] == gc["kept_bytes"]
    # Each namespace's shared index ({prefix}:index:<tier name>) lists exactly the blocks still there.
    indexed = {k for ns in ("insp:model-a", "insp:model-b") for k, _ in RedisPrefixIndex(client, ns).members("redis")}
    live = {bytes.fromhex(n.decode().rpartition(":b:")[2]) for n in client.scan_iter(match="insp:*:b:*")}
    assert indexed == live and len(live) == gc["kept_blocks"]
    assert client.get("insp:model-a:other") == b"not a block"  # not a block: never touched
    client.close()
    a.close()
    b.close()


def test_inspect_a_config_covers_its_disk_and_redis_tiers(tmp_path: Path, redis_server: Any,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = {"tiers": [
        {"kind": "dram", "capacity": "1MiB", "pin_memory": "never"},
        {"kind": "disk", "capacity": "1MiB", "path": str(tmp_path / "disk")},
        {"kind": "redis", "capacity": 0, "url": redis_server.url, "key_prefix": "cfgtest"},
    ]}
    path = tmp_path / "kvtier.yaml"
    path.write_text(yaml.safe_dump(cfg))
    disk = tier_from(cfg["tiers"][1])
    disk.put(key(5, 1), disk.codec.encode(key(5, 1), block(1, 4096)))
    redis = tier_from(cfg["tiers"][2])
    for i in range(2):
        redis.put(key(6, i), redis.codec.encode(key(6, i), block(i, 4096)))
    report = run(capsys, "inspect", "--config", str(path), "--json")
    assert [(s["kind"], s["blocks"]) for s in report["sources"]] == [("disk", 1), ("redis", 2)]
    done = run(capsys, "gc", "--config", str(path), "--max-size", "0", "--json")
    assert [s["removed_blocks"] for s in done["sources"]] == [1, 2]
    redis.close()


# ---- S3 (SeaweedFS) -------------------------------------------------------------------------------------------

def test_inspect_and_gc_s3(seaweed_server: Any, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed_server.secret_key)
    tier = tier_from({"kind": "s3", "capacity": 0, "bucket": S3_BUCKET, "prefix": "insp/model-s",
                      "endpoint_url": seaweed_server.endpoint_url, "addressing_style": "path",
                      "region": "us-east-1", "codec": {"name": "zstd", "shuffle": True}})
    for i in range(5):
        tier.put(key(7, i), tier.codec.encode(key(7, i), block(i, 8192)))
    url, endpoint = f"s3://{S3_BUCKET}/insp/", seaweed_server.endpoint_url
    report = run(capsys, "inspect", "--s3", url, "--endpoint", endpoint, "--json")
    [src] = report["sources"]
    assert src["blocks"] == 5 and src["corrupt_blocks"] == 0
    assert [(g["namespace"], g["codec"], g["raw_block_bytes"]) for g in src["groups"]] == \
        [("insp/model-s", "zstd+shuffle", 8192)]
    assert src["oldest_age_s"] is not None and -5 < src["oldest_age_s"] < 600
    done = run(capsys, "gc", "--s3", url, "--endpoint", endpoint, "--max-size", "0", "--json")
    assert done["sources"][0]["removed_blocks"] == 5
    after = run(capsys, "inspect", "--s3", url, "--endpoint", endpoint, "--json")
    assert after["sources"][0]["blocks"] == 0
    tier.close()


def test_the_kvtier_command_dispatches_inspect_and_gc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvtier import cli

    root = tmp_path / "disk"
    fill_disk(root)
    assert cli.main(["inspect", "--disk", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sources"][0]["blocks"] == 12
    assert cli.main(["gc", "--disk", str(root), "--max-age", "7d", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sources"][0]["removed_blocks"] == 5
    assert cli.main(["gc", "--disk", str(root)]) == 2  # no limit: a clear error, exit code 2
    assert "--max-age, --max-size" in capsys.readouterr().err
