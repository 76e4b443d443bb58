"""DramTier and DiskTier: the shared Tier contract, plus local scenarios narrated step by step."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from tier_contract import CAPACITY, TierContract, make_key, make_record

from kvtier.codecs import BlockCodec
from kvtier.config import CodecConfig
from kvtier.errors import CorruptBlockError, TierError, TierFullError
from kvtier.hostmem import populate
from kvtier.policies.lru import LRUPolicy
from kvtier.tiers.disk import STALE_TMP_S, DiskOptions, DiskTier
from kvtier.tiers.dram import DramOptions, DramTier

PAGE = 16 * 1024


def dram(capacity: int = CAPACITY, page: int = PAGE, pin: str = "never") -> DramTier:
    return DramTier("dram", capacity, BlockCodec(CodecConfig()), LRUPolicy(), DramOptions(pin, page))


def disk(path: Path, capacity: int = CAPACITY, codec: str = "lz4", **opts: bool) -> DiskTier:
    return DiskTier("disk", capacity, BlockCodec(CodecConfig(codec)), LRUPolicy(), DiskOptions(str(path), **opts))


def kvb_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.kvb"))


class TestDramContract(TierContract):
    @pytest.fixture
    def tier(self) -> Iterator[DramTier]:
        t = dram()
        yield t
        t.close()


class TestDiskContract(TierContract):
    @pytest.fixture
    def tier(self, tmp_path: Path) -> Iterator[DiskTier]:
        t = disk(tmp_path / "disk")
        yield t
        t.close()


class TestDiskDirectFsyncContract(TierContract):
    THREAD_ROUNDS = 15

    @pytest.fixture
    def tier(self, tmp_path: Path) -> Iterator[DiskTier]:
        t = disk(tmp_path / "disk", o_direct=True, fsync=True)  # falls back (one warning) where refused
        yield t
        t.close()


# ---- disk scenarios ------------------------------------------------------------------------------------

def test_disk_restart_keeps_blocks_readable(tmp_path: Path) -> None:
    codec = BlockCodec(CodecConfig("lz4"))
    raws = {make_key(i): bytes([i]) * 1000 + os.urandom(3000) for i in range(10)}
    # 1. A first process stores ten encoded blocks and goes away.
    first = disk(tmp_path, codec="lz4", fsync=True)
    for key, raw in raws.items():
        first.put(key, codec.encode(key, raw))
    used = first.used_bytes
    first.close()
    # 2. A new tier on the same directory knows nothing until load_existing() scans it.
    second = disk(tmp_path, codec="lz4")
    assert len(second) == 0
    assert second.load_existing() == 10
    # 3. Same keys, same accounting, and every record decodes (key and checksum verified) to the same bytes.
    assert sorted(second.keys()) == sorted(raws) and second.used_bytes == used
    for key, raw in raws.items():
        record = second.get(key)
        assert record is not None and codec.decode(key, record) == raw
    # 4. Scanning again adopts nothing twice.
    assert second.load_existing() == 0 and second.used_bytes == used


def test_disk_restart_keeps_lru_order_and_capacity(tmp_path: Path) -> None:
    # 1. Store three blocks, oldest first (mtimes set explicitly so the order does not depend on timing).
    first = disk(tmp_path, capacity=100_000)
    keys = [make_key(f"o{i}") for i in range(3)]
    for i, key in enumerate(keys):
        first.put(key, make_record(key, 20_000))
        os.utime(first.path_of(key), ns=(i * 10**9, i * 10**9))
    # 2. After a restart the oldest file is the first victim.
    second = disk(tmp_path, capacity=100_000)
    second.load_existing()
    victims = second.put(make_key("new"), make_record(make_key("new"), 50_000))
    assert [k for k, _ in victims] == [keys[0]]
    # 3. A restart with a smaller capacity drops (and deletes) what does not fit.
    third = disk(tmp_path, capacity=45_000)
    assert third.load_existing() == 2
    assert third.used_bytes <= 45_000 and len(kvb_files(tmp_path)) == 2


def test_disk_restart_removes_stale_temp_files(tmp_path: Path) -> None:
    # 1. A crash mid-write leaves a temp file beside a good record, and foreign files lie around.
    tier = disk(tmp_path)
    key = make_key("good")
    tier.put(key, make_record(key, 5000))
    fan = tier.path_of(key).parent
    stale = fan / f".{key.hex()}.123-456-0.tmp"
    stale.write_bytes(b"half a record")
    old = time.time() - STALE_TMP_S - 60
    os.utime(stale, (old, old))
    # ... while another live process writes a record right now: its temp file is fresh and must survive.
    live = fan / f".{key.hex()}.789-1-0.tmp"
    live.write_bytes(b"a write in flight")
    (fan / "README").write_text("not ours")
    # 2. The restart scan removes the stale temp file only, ignores the foreign one, adopts the good record.
    again = disk(tmp_path)
    assert again.load_existing() == 1
    assert not stale.exists() and live.exists() and (fan / "README").exists()
    assert again.get(key) == make_record(key, 5000)


def test_disk_corruption_is_detected_never_wrong_bytes(tmp_path: Path) -> None:
    codec = BlockCodec(CodecConfig("lz4"))
    tier = disk(tmp_path)
    raws = {make_key(i): os.urandom(2000) + bytes(6000) for i in range(3)}
    for key, raw in raws.items():
        tier.put(key, codec.encode(key, raw))
    flipped, truncated, swapped = raws
    # 1. Flip one byte in the middle of a file: decode raises instead of returning changed bytes.
    path = tier.path_of(flipped)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBlockError):
        codec.decode(flipped, tier.get(flipped) or b"")
    # 2. Truncate a file: decode raises.
    path = tier.path_of(truncated)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptBlockError):
        codec.decode(truncated, tier.get(truncated) or b"")
    # 3. Another block's file copied over this one: the key in the header does not match.
    shutil.copyfile(tier.path_of(truncated), tier.path_of(swapped))
    with pytest.raises(CorruptBlockError):
        codec.decode(swapped, tier.get(swapped) or b"")


def test_disk_never_exceeds_capacity_on_disk(tmp_path: Path) -> None:
    # Write 20x the capacity with random-sized records; after every put the directory holds at most capacity.
    tier = disk(tmp_path, capacity=256 * 1024)
    for i in range(300):
        key = make_key(f"cap{i}")
        tier.put(key, make_record(key, 1000 + (i * 7919) % 40_000))
        on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
        assert on_disk == tier.used_bytes <= tier.capacity
    assert len(kvb_files(tmp_path)) == len(tier)


def test_disk_view_reads_into_one_buffer_per_thread(tmp_path: Path) -> None:
    """A hit's records are read into the thread's buffer, reused record after record (no fresh memory to fault
    in each time); a larger record grows it; ``get`` still hands out bytes of their own."""
    t = disk(tmp_path / "disk")
    small, large = make_record(make_key(1), 20_000), make_record(make_key(2), 50_000)
    t.put(make_key(1), small)
    t.put(make_key(2), large)
    first = t.view(make_key(1))
    assert isinstance(first, memoryview) and bytes(first) == small
    again = t.view(make_key(1))
    assert isinstance(again, memoryview) and again.obj is first.obj  # the same memory, not a new buffer
    grown = t.view(make_key(2))
    assert isinstance(grown, memoryview) and bytes(grown) == large
    assert t.view(make_key(1)).obj is grown.obj  # type: ignore[union-attr]
    assert t.get(make_key(1)) == small and isinstance(t.get(make_key(1)), bytes)
    assert t.view(make_key(3)) is None
    t.close()


def test_disk_layout_fan_out(tmp_path: Path) -> None:
    tier = disk(tmp_path)
    key = make_key("layout")
    tier.put(key, make_record(key, 10))
    assert tier.path_of(key) == tmp_path / key.hex()[:2] / f"{key.hex()}.kvb"
    assert kvb_files(tmp_path) == [tier.path_of(key)]


def test_disk_file_deleted_behind_our_back_is_a_miss(tmp_path: Path) -> None:
    tier = disk(tmp_path)
    key = make_key("vanish")
    tier.put(key, make_record(key, 100))
    tier.path_of(key).unlink()
    assert tier.get(key) is None and not tier.contains(key) and tier.used_bytes == 0


def test_disk_filesystem_nearly_full_refuses_and_loses_nothing(tmp_path: Path, monkeypatch) -> None:
    tier = disk(tmp_path)
    key = make_key("kept")
    tier.put(key, make_record(key, 100))
    # The filesystem reports almost no free space: the write is refused before touching the disk.
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    new = make_key("new")
    with pytest.raises(TierFullError, match=str(tmp_path)):
        tier.put(new, make_record(new, 100))
    assert not tier.contains(new) and tier.get(key) == make_record(key, 100)
    assert not list(tmp_path.rglob("*.tmp"))
    # A small filesystem (100 MiB, 20 MiB free) keeps a proportional margin (5%) and still takes writes.
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(100 << 20, 80 << 20, 20 << 20))
    tier.put(new, make_record(new, 100))
    assert tier.contains(new)


def test_disk_os_error_becomes_tier_error_with_path(tmp_path: Path, monkeypatch) -> None:
    tier = disk(tmp_path)
    key = make_key("k")

    def refuse(src: object, dst: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(TierError, match=key.hex()):
        tier.put(key, make_record(key, 100))
    assert not tier.contains(key) and tier.used_bytes == 0
    assert not list(tmp_path.rglob("*.tmp"))  # the temp file is cleaned up


def test_disk_unusable_path_is_tier_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TierError, match="file"):
        disk(blocker / "sub")


def test_disk_o_direct_writes_exact_sizes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tier = disk(tmp_path, o_direct=True)
    with caplog.at_level(logging.WARNING):
        for size in (0, 1, 4040, 4096, 100_000):
            key = make_key(f"d{size}")
            record = make_record(key, size)
            tier.put(key, record)
            assert tier.path_of(key).stat().st_size == len(record)  # padding truncated away
            assert tier.get(key) == record
    assert len([r for r in caplog.records if "O_DIRECT" in r.message]) <= 1  # warns at most once



@pytest.mark.parametrize("o_direct", [False, True])
def test_disk_writes_a_large_record_in_bounded_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      o_direct: bool) -> None:
    """A save thread's write() holds the CPU until it returns on kernels without preemption: a record goes to its
    file in pieces of at most WRITE_PIECE bytes, and reads back whole."""
    from kvtier.tiers import disk as disk_module

    tier = disk(tmp_path, capacity=64 << 20, codec="none", o_direct=o_direct)
    sizes: list[int] = []
    real_write = os.write

    def write(fd: int, data: bytes | memoryview) -> int:
        sizes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(disk_module.os, "write", write)
    key = make_key("large")
    record = make_record(key, 5 * disk_module.WRITE_PIECE + 1234)
    tier.put(key, record)
    assert len(sizes) >= 6 and max(sizes) <= disk_module.WRITE_PIECE
    assert tier.get(key) == record


# ---- DRAM scenarios ------------------------------------------------------------------------------------

def test_dram_pool_is_allocated_once_and_pages_are_reused() -> None:
    tier = dram(capacity=10 * PAGE + 123)  # rounds down to whole pages
    assert tier.capacity == 10 * PAGE and tier.num_pages == 10 and tier.free_pages == 10
    pool = tier._pool
    assert pool is not None and pool.numel() == 10 * PAGE
    # 1. A record of 2.5 pages takes 3 pages; used_bytes counts whole pages, record_bytes the exact size.
    a = make_key("a")
    rec_a = make_record(a, 2 * PAGE + PAGE // 2)
    tier.put(a, rec_a)
    assert tier.free_pages == 7 and tier.used_bytes == 3 * PAGE and tier.record_bytes == len(rec_a)
    # 2. Deleting returns the pages; the next record reuses them and the pool is the same tensor.
    tier.delete(a)
    assert tier.free_pages == 10 and tier.used_bytes == 0
    b = make_key("b")
    tier.put(b, make_record(b, PAGE))  # header pushes it to 2 pages
    assert tier.free_pages == 8 and tier._pool is pool
    assert tier._pages[b][0] == [0, 1]  # the pages freed first come back first, contiguous


def test_dram_eviction_frees_enough_pages() -> None:
    # Nine small records (~2 KiB each) take one whole page each. Exact-byte accounting would see ~18 KiB used
    # of 160 KiB and evict nothing for a 3-page record; page accounting evicts the two oldest.
    tier = dram(capacity=10 * PAGE)
    stored = {}
    for i in range(9):
        key = make_key(f"p{i}")
        stored[key] = make_record(key, PAGE // 8)
        tier.put(key, stored[key])
        assert tier.free_pages >= 0 and tier.used_bytes <= tier.capacity
    assert len(tier) == 9 and tier.free_pages == 1
    big = make_key("big")
    victims = tier.put(big, make_record(big, 2 * PAGE))  # 3 pages: evicts the two oldest
    assert [k for k, _ in victims] == list(stored)[:2]
    assert all(rec == stored[k] for k, rec in victims)
    assert tier.free_pages == 0 and tier.used_bytes == tier.capacity


def test_dram_scattered_pages_roundtrip() -> None:
    # Free every other small record so a large record must span non-contiguous pages.
    tier = dram(capacity=12 * PAGE)
    keys = [make_key(f"s{i}") for i in range(12)]
    for key in keys:
        tier.put(key, make_record(key, PAGE - 100))
    for key in keys[::2]:
        tier.delete(key)
    big = make_key("scattered")
    record = make_record(big, 5 * PAGE + 17)
    tier.put(big, record)
    pages = tier._pages[big][0]
    assert pages != list(range(pages[0], pages[0] + len(pages)))  # really scattered
    assert tier.get(big) == record


def test_dram_pinning_choice() -> None:
    assert dram(pin="never").pinned is False
    assert dram(pin="auto").pinned is torch.cuda.is_available()
    if torch.cuda.is_available():
        tier = dram(pin="always")
        assert tier.pinned and tier._pool is not None and tier._pool.is_pinned()
    else:
        with pytest.raises(TierError, match="pin"):
            dram(pin="always")


def _kernel_populates() -> bool:
    probe = np.zeros(1 << 16, dtype=np.uint8)
    return populate(probe.ctypes.data, probe.nbytes)


needs_populate = pytest.mark.skipif(not _kernel_populates(), reason="no madvise(MADV_POPULATE_WRITE) (Linux < 5.14)")


_FAULTS_PROBE = """
import mmap, resource, sys
from pathlib import Path
from tier_contract import make_key, make_record
from kvtier.codecs import BlockCodec
from kvtier.config import CodecConfig
from kvtier.policies.lru import LRUPolicy
from kvtier.tiers.dram import DramOptions, DramTier

def faults_writing(tier, records):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for key, record in records.items():
        tier.put(key, record)
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before

PAGE = 16 * 1024
records = {make_key(f"f{i}"): make_record(make_key(f"f{i}"), 15 * PAGE) for i in range(60)}  # ~14 MiB
cold = DramTier("dram", 64 << 20, BlockCodec(CodecConfig()), LRUPolicy(), DramOptions("never", PAGE, False))
assert cold._prefaulter is None
cold_faults = faults_writing(cold, records)
warm = DramTier("dram", 64 << 20, BlockCodec(CodecConfig()), LRUPolicy(), DramOptions("never", PAGE))
assert warm._prefaulter is not None
warm._prefaulter.join(timeout=30)
warm_faults = faults_writing(warm, records)
assert all(warm.get(key) == record for key, record in records.items())
warm.close()
cold.close()
print(cold_faults, warm_faults, sum(map(len, records.values())) // mmap.PAGESIZE)
"""


@needs_populate
def test_dram_pool_is_faulted_in_ahead_of_the_first_writes() -> None:
    # In a fresh process: in this one, an earlier test may have left the allocator keeping freed memory that
    # was faulted in already, and a "cold" pool made of it would show no faults to compare with.
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-c", _FAULTS_PROBE], check=False, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    cold, warm, pages = map(int, out.stdout.split())
    if "[always]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        assert cold > pages // 2  # a fault per page written (fewer only with huge pages)
    assert warm < 500


@needs_populate
def test_populate_keeps_contents_and_refuses_what_it_cannot_do() -> None:
    data = np.arange(1 << 20, dtype=np.uint32)
    expect = data.copy()
    assert populate(data.ctypes.data, data.nbytes)
    assert np.array_equal(data, expect)
    assert not populate(0, 1 << 16)  # not mapped
    stop = threading.Event()
    stop.set()
    assert not populate(data.ctypes.data, data.nbytes, stop=stop)


def test_dram_close_stops_the_prefault_promptly() -> None:
    tier = DramTier("dram", 4 << 30, BlockCodec(CodecConfig()), LRUPolicy(), DramOptions("never", 1 << 20))
    thread = tier._prefaulter
    start = time.monotonic()
    tier.close()
    assert thread is not None and not thread.is_alive() and time.monotonic() - start < 2


def test_dram_rejects_capacity_below_one_page() -> None:
    with pytest.raises(TierError):
        dram(capacity=PAGE - 1)


def test_disk_o_direct_refused_falls_back_once(tmp_path: Path, monkeypatch, caplog: pytest.LogCaptureFixture) -> None:
    # 1. Simulate a filesystem that refuses O_DIRECT at open() with EINVAL (as tmpfs did before Linux 6.6).
    real_open = os.open

    def picky_open(path: object, flags: int, *args: object) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", picky_open)
    tier = disk(tmp_path, o_direct=True)
    # 2. Every write still lands, through the page cache, and the tier warns exactly once.
    with caplog.at_level(logging.WARNING):
        for i in range(3):
            key = make_key(f"fb{i}")
            tier.put(key, make_record(key, 5000))
            assert tier.get(key) == make_record(key, 5000)
    assert len([r for r in caplog.records if "O_DIRECT" in r.message]) == 1
    assert not list(tmp_path.rglob("*.tmp"))
