"""TierStack scenarios over a real DRAM tier and a real disk tier, narrated step by step."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvtier.codecs import HEADER_SIZE, RawBytes
from kvtier.config import KVTierConfig
from kvtier.tiers.stack import Place, TierStack

BLOCK = 64 * 1024


def make_stack(tmp_path: Path, dram: str = "256KiB", disk: str = "1MiB", **extra) -> TierStack:
    cfg = KVTierConfig.from_dict({"tiers": [
        {"kind": "dram", "capacity": dram, "page_size": "16KiB"},
        {"kind": "disk", "capacity": disk, "path": str(tmp_path / "disk"), "codec": {"name": "lz4", "shuffle": True}},
    ], **extra}, env={})
    return TierStack.from_config(cfg)


def block(i: int) -> bytes:
    return (i.to_bytes(4, "little") * (BLOCK // 4))[:BLOCK // 2] + os.urandom(BLOCK // 2)


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_spill_to_disk_then_promote_back(tmp_path: Path) -> None:
    events: list[tuple[bytes, str | None]] = []
    stack = make_stack(tmp_path)
    stack.on_change = lambda k, t: events.append((k, t))
    data = {i: block(i) for i in range(10)}
    # 1. Ten 64 KiB blocks into a 256 KiB DRAM tier: the oldest spill to disk.
    for i, raw in data.items():
        assert stack.put(key(i), raw)
    assert stack.where(key(0)) == "disk" and stack.where(key(9)) == "dram"
    assert (key(0), "disk") in events
    # 2. Reading block 0 from disk promotes it back into DRAM.
    got = stack.get(key(0))
    assert got == (data[0], "disk")
    assert stack.tiers[0].contains(key(0))
    # 3. Every block reads back byte-identical, whichever tier holds it.
    for i, raw in data.items():
        got = stack.get(key(i))
        assert got is not None and got[0] == raw
    snap = stack.metrics.snapshot()
    assert snap["disk"]["hits"] >= 1 and snap["disk"]["promotions"] >= 1 and snap["dram"]["demotions"] >= 1


def test_an_evicted_block_the_tier_below_holds_is_not_copied_out_again(tmp_path: Path) -> None:
    stack = make_stack(tmp_path)
    data = {i: block(i) for i in range(10)}
    for i, raw in data.items():
        stack.put(key(i), raw)
    assert stack.get(key(0)) == (data[0], "disk")  # promoted into DRAM, and still on disk
    assert stack.tiers[0].contains(key(0)) and stack.tiers[1].contains(key(0))
    dram = stack.tiers[0]
    read_out: list[bytes] = []
    real_read = dram._read
    dram._read = lambda k: read_out.append(k) or real_read(k)  # type: ignore[method-assign]
    for i in range(10, 14):  # four more blocks push block 0 (and others) out of DRAM
        stack.put(key(i), block(i))
    assert not dram.contains(key(0))
    assert key(0) not in read_out  # the disk tier holds it: nothing to demote
    assert read_out  # blocks the disk does not hold yet were still read out and demoted
    assert stack.where(key(0)) == "disk" and stack.get(key(0)) == (data[0], "disk")
    assert stack.metrics.snapshot()["dram"].get("drops", 0) == 0


def test_a_top_tier_too_small_for_one_block_is_skipped_and_named(tmp_path: Path, caplog) -> None:
    stack = make_stack(tmp_path, dram="64KiB")  # a 64 KiB block plus its header takes five 16 KiB pages
    encoded: list[bytes] = []
    real_encode = stack.tiers[0].codec.encode
    stack.tiers[0].codec.encode = lambda k, raw: encoded.append(k) or real_encode(k, raw)  # type: ignore[method-assign]
    with caplog.at_level("WARNING"):
        stack.raw_size = BLOCK
    assert "tier dram" in caplog.text and "cannot hold one block" in caplog.text
    data = {i: block(i) for i in range(3)}
    for i, raw in data.items():
        assert stack.put(key(i), raw)
    for i, raw in data.items():
        assert stack.get(key(i)) == (raw, "disk")  # served from disk, and not promoted
    assert encoded == []  # no record was made for a tier that would refuse it
    snap = stack.metrics.snapshot()
    assert snap.get("dram", {}).get("errors", 0) == 0 and snap["disk"]["puts"] == 3


def test_a_stack_whose_every_tier_is_too_small_refuses_puts(tmp_path: Path) -> None:
    cfg = KVTierConfig.from_dict({"tiers": [
        {"kind": "dram", "capacity": "64KiB", "page_size": "16KiB"},
        {"kind": "disk", "capacity": "64KiB", "path": str(tmp_path / "disk"), "codec": "none"},
    ]}, env={})
    stack = TierStack.from_config(cfg)
    stack.raw_size = BLOCK  # a record is 64 KiB plus a header: neither tier can ever hold one
    assert stack.put(key(1), block(1)) is False
    assert stack.get(key(1)) is None


def test_get_many_serves_each_key_from_its_tier_in_order(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, promote_on_hit=False)
    data = {i: block(i) for i in range(8)}
    for i, raw in data.items():
        stack.put(key(i), raw)
    got = stack.get_many([key(0), key(99), key(7), key(3)])
    assert [g if g is None else g[0] for g in got] == [data[0], None, data[7], data[3]]
    assert got[0][1] == "disk" and got[2][1] == "dram"  # type: ignore[index]


def test_last_tier_drops_and_reports_gone(tmp_path: Path) -> None:
    events: list[tuple[bytes, str | None]] = []
    stack = make_stack(tmp_path, dram="128KiB", disk="200KiB")
    stack.on_change = lambda k, t: events.append((k, t))
    for i in range(12):
        stack.put(key(i), os.urandom(BLOCK))  # incompressible: disk holds at most 3
    assert stack.where(key(0)) is None
    assert (key(0), None) in events
    assert stack.tiers[1].used_bytes <= stack.tiers[1].capacity
    assert stack.get(key(0)) is None


def test_corrupt_disk_block_is_a_miss_and_removed(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, promote_on_hit=False)
    for i in range(8):
        stack.put(key(i), block(i))
    files = {p.stem: p for p in (tmp_path / "disk").rglob("*.kvb")}
    target = files[key(0).hex()]
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    assert stack.get(key(0)) is None  # never wrong bytes
    assert stack.where(key(0)) is None
    assert stack.metrics.snapshot()["disk"]["checksum_failures"] == 1
    got = stack.get(key(1))
    assert got is not None and got[0][:BLOCK // 2] == block(1)[:BLOCK // 2]


def test_restart_recovers_disk_tier(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, dram="64KiB")
    data = {i: block(i) for i in range(6)}
    for i, raw in data.items():
        stack.put(key(i), raw)
    on_disk = [i for i in data if stack.where(key(i)) == "disk"]
    stack.close()
    # A new process would build a new stack over the same directory: the disk index is rebuilt.
    again = make_stack(tmp_path, dram="64KiB")
    assert on_disk and all(again.where(key(i)) == "disk" for i in on_disk)
    for i in on_disk:
        assert again.get(key(i))[0] == data[i]  # type: ignore[index]


def test_write_through_tier_gets_every_put(tmp_path: Path) -> None:
    cfg = KVTierConfig.from_dict({"tiers": [
        {"kind": "dram", "capacity": "1MiB"},
        {"kind": "disk", "capacity": "1MiB", "path": str(tmp_path / "wt"), "write_through": True},
    ]}, env={})
    stack = TierStack.from_config(cfg)
    stack.put(key(1), block(1))
    assert stack.tiers[0].contains(key(1)) and stack.tiers[1].contains(key(1))


def test_block_larger_than_dram_goes_to_disk(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, dram="32KiB")
    assert stack.put(key(1), block(1))
    assert stack.where(key(1)) == "disk"


@pytest.mark.parametrize("policy", ["lru", "lfu", "arc", "attention"])
def test_every_policy_drives_spill(tmp_path: Path, policy: str) -> None:
    cfg = KVTierConfig.from_dict({"tiers": [
        {"kind": "dram", "capacity": "256KiB", "policy": policy},
        {"kind": "disk", "capacity": "2MiB", "path": str(tmp_path / policy), "policy": policy},
    ]}, env={})
    stack = TierStack.from_config(cfg)
    data = {i: block(i) for i in range(12)}
    for i, raw in data.items():
        stack.put(key(i), raw)
    assert stack.tiers[0].used_bytes <= stack.tiers[0].capacity
    for i, raw in data.items():
        got = stack.get(key(i))
        assert got is not None and got[0] == raw


def test_a_block_being_demoted_is_still_served(tmp_path: Path) -> None:
    """The victim of a DRAM eviction is readable while its disk write is still in progress."""
    import threading

    stack = make_stack(tmp_path)
    disk = stack.tiers[1]
    writing, release = threading.Event(), threading.Event()
    real_write = disk._write

    def slow_write(k: bytes, record: bytes) -> None:
        writing.set()
        assert release.wait(10)
        real_write(k, record)

    data = {i: block(i) for i in range(4)}
    for i in range(3):  # DRAM holds three of these blocks
        assert stack.put(key(i), data[i])
    disk._write = slow_write  # type: ignore[method-assign]
    putter = threading.Thread(target=stack.put, args=(key(3), data[3]))
    putter.start()
    try:
        assert writing.wait(10)  # block 0 has left DRAM and is not on disk yet
        assert not stack.tiers[0].contains(key(0)) and not disk.contains(key(0))
        assert stack.where(key(0)) == "dram"
        assert stack.get(key(0)) == (data[0], "dram")
        assert stack.metrics.snapshot()["dram"]["transit_hits"] == 1
    finally:
        release.set()
        putter.join(10)
    assert stack.where(key(0)) == "disk" and stack.get(key(0))[0] == data[0]
    assert not stack._transit


def _placer(out: dict[int, bytearray], during: Callable[[int], None] = lambda i: None) -> Place:
    """A destination like the host KV caches: block i lands in ``out[i]`` in 4 parts, each yielded once written;
    ``during(i)`` runs between the parts (what a concurrent writer could do meanwhile)."""
    def place(i: int, raw: RawBytes) -> Iterator[memoryview]:
        dst = out.setdefault(i, bytearray(len(raw)))
        step = len(raw) // 4
        for start in range(0, len(raw), step):
            dst[start:start + step] = raw[start:start + step]
            yield memoryview(dst)[start:start + step]
            during(i)
    return place


def test_load_many_lands_blocks_from_every_tier_and_checks_what_landed(tmp_path: Path) -> None:
    stack = make_stack(tmp_path)
    data = {i: block(i) for i in range(6)}
    for i, raw in data.items():
        stack.put(key(i), raw)  # 0 and 1 spilled to disk (lz4 + shuffle), 2..5 in DRAM (read in place)
    assert stack.where(key(0)) == "disk" and stack.where(key(5)) == "dram"
    out: dict[int, bytearray] = {}
    served = stack.load_many([key(0), key(5), key(99), key(3)], _placer(out))
    assert served == ["disk", "dram", None, "dram"]
    assert out[0] == data[0] and out[1] == data[5] and out[3] == data[3] and 2 not in out
    assert stack.tiers[0].contains(key(0))  # the disk hit was promoted as usual


def test_a_dram_record_reused_while_it_is_copied_out_is_a_miss(tmp_path: Path) -> None:
    """The DRAM tier hands out views of its pool. If the record's pages are rewritten mid-copy (evicted and
    reused by another block), what landed no longer matches the checksum: a miss, never mixed bytes."""
    stack = make_stack(tmp_path, dram="256KiB")
    a, b = block(1), block(2)
    stack.put(key(1), a)
    dram = stack.tiers[0]
    pages, length = dram._pages[key(1)]  # type: ignore[attr-defined]
    start = pages[0] * dram.page_size  # type: ignore[attr-defined]

    def overwrite(i: int) -> None:  # the pool memory under the view changes half-way through the copy
        dram._mem[start + HEADER_SIZE:start + length] = b"\xee" * (length - HEADER_SIZE)  # type: ignore[attr-defined]

    out: dict[int, bytearray] = {}
    assert stack.load_many([key(1)], _placer(out, overwrite)) == [None]
    assert stack.metrics.snapshot()["dram"]["checksum_failures"] == 1
    assert not dram.contains(key(1))  # the damaged record is gone; vLLM recomputes the block
    # A record that stays put while it is copied loads byte-identical.
    stack.put(key(2), b)
    assert stack.load_many([key(2)], _placer(out)) == ["dram"] and out[0] == b


def test_raw_dram_hits_are_copied_on_the_calling_thread_and_decodes_use_the_threads(tmp_path: Path) -> None:
    """A raw DRAM record's hit is a copy and a checksum, both holding the GIL: handing them to threads only adds
    hand-offs (measured in benchmarks/bench_connector_ttft.py). Records that need decoding still use them."""
    stack = make_stack(tmp_path)
    for i in range(6):
        stack.put(key(i), block(i))  # 0..2 spilled to disk (lz4), 3..5 in DRAM
    mapped: list[int] = []

    def threads(fn, items):  # stands in for a thread pool's map, recording what it was given
        items = list(items)
        mapped.append(len(items))
        return list(map(fn, items))

    out: dict[int, bytearray] = {}
    assert stack.load_many([key(3), key(4), key(5)], _placer(out), threads) == ["dram"] * 3
    assert mapped == []
    assert stack.load_many([key(0), key(1)], _placer(out), threads) == ["disk", "disk"]
    assert mapped == [2]  # each disk record is read, decoded and placed in one job


def test_a_promoted_disk_hit_keeps_its_bytes_after_the_read_buffer_is_reused(tmp_path: Path) -> None:
    """load_many reads disk records into a buffer the thread reuses for its next record. A promotion that runs
    later (in the background) must have taken its own copy, or DRAM would store the next record's bytes under
    this key with a checksum of them: wrong KV served as a hit."""
    cfg = KVTierConfig.from_dict({"tiers": [
        {"kind": "dram", "capacity": "256KiB", "page_size": "16KiB"},
        {"kind": "disk", "capacity": "1MiB", "path": str(tmp_path / "disk"), "codec": "none"},
    ], "promote_on_hit": "always"}, env={})
    later: list[Callable[[], None]] = []
    stack = TierStack.from_config(cfg, background=later.append)
    data = {i: block(i) for i in range(8)}
    for i, raw in data.items():
        stack.put(key(i), raw)  # 0..3 spilled to disk, uncompressed: the raw bytes are a view of the buffer
    out: dict[int, bytearray] = {}
    assert stack.load_many([key(0), key(1), key(2)], _placer(out)) == ["disk"] * 3
    assert [out[i] == data[i] for i in range(3)] == [True] * 3
    for job in later:  # the promotions run after the buffer was overwritten by the next records
        job()
    for i in range(3):
        assert stack.tiers[0].contains(key(i))
        assert stack.get(key(i)) == (data[i], "dram")
