"""KVLayout, StagingPool and KVCopier on CPU tensors, in the CPU layout, a flash-attention layout, a permuted
view and layers of different shapes: exact bytes, the record format, bounded staging."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier.errors import ConfigError
from kvtier.transfer import KVCopier, KVLayout, StagingPool, StagingTimeout

NUM_BLOCKS = 6


def caches(layout: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if layout == "permuted":  # stored [blocks, 2, heads, block, head], handed over as [2, blocks, block, heads, head]
        raw = [torch.randn(NUM_BLOCKS, 2, 2, 16, 32, generator=gen).to(torch.bfloat16) for _ in range(3)]
        return {f"layers.{i}.attn": t.permute(1, 0, 3, 2, 4) for i, t in enumerate(raw)}
    if layout == "mixed":  # layers of different widths
        return {f"layers.{i}.attn": torch.randn(NUM_BLOCKS, 2, 16, 32 * (i + 1), generator=gen).to(torch.bfloat16)
                for i in range(3)}
    shape = (NUM_BLOCKS, 2, 16, 64) if layout == "cpu" else (2, NUM_BLOCKS, 16, 2, 32)
    return {f"layers.{i}.attn": torch.randn(shape, generator=gen).to(torch.bfloat16) for i in range(3)}


def block_dim(layout: str) -> int:
    return 1 if layout in ("flash", "permuted") else 0


def copier(kv: dict[str, torch.Tensor], path: str = "direct", chunk_blocks: int = 2, slots: int = 4) -> KVCopier:
    """``direct``: the CPU build's copies; ``buffered``: the CUDA path's (layer groups through a device buffer),
    here on CPU; ``grouped``: that with a buffer of one layer, so every layer moves in its own copy."""
    layout = KVLayout(kv, NUM_BLOCKS)
    per_slot = chunk_blocks * (layout.block_bytes + 8)
    pool = StagingPool(layout.block_bytes, slots * per_slot + 8, chunk_blocks * layout.block_bytes, pin=False,
                       wait_s=0.2)
    small = chunk_blocks * layout.max_layer_bytes if path == "grouped" else None
    return KVCopier(layout, pool, buffered=path != "direct", buffer_bytes=small)


def reference(kv: dict[str, torch.Tensor], dim: int, ids: list[int]) -> np.ndarray:
    """The record format, computed independently: each layer's block in logical order, layers concatenated."""
    return np.stack([torch.cat([t.select(dim, b).contiguous().view(torch.uint8).flatten() for t in kv.values()])
                     .numpy() for b in ids])


@pytest.mark.parametrize("path", ["direct", "buffered", "grouped"])
@pytest.mark.parametrize("layout", ["cpu", "flash", "permuted", "mixed"])
def test_save_then_load_moves_exact_blocks_in_the_record_format(layout: str, path: str) -> None:
    src = caches(layout)
    dst = {name: torch.zeros_like(t) for name, t in src.items()}
    dim = block_dim(layout)
    ids = [4, 1, 5, 0, 2]  # unsorted, more than one chunk, the last one partly filled
    records = copier(src, path).save_now(ids)
    assert np.array_equal(records, reference(src, dim, ids))
    copier(dst, path).load_now([0, 5, 3, 1, 2], records)  # block 4 -> 0, 1 -> 5, 5 -> 3, 0 -> 1, 2 -> 2
    for name in src:
        for s, d in ((4, 0), (1, 5), (5, 3), (0, 1), (2, 2)):
            assert torch.equal(dst[name].select(dim, d), src[name].select(dim, s))
        assert not dst[name].select(dim, 4).any()


def test_layers_are_grouped_into_copies_of_bounded_size() -> None:
    layout = KVLayout(caches("mixed"), NUM_BLOCKS)  # layer blocks of 2, 4 and 6 KiB
    assert [layer.nbytes for layer in layout.layers] == [2048, 4096, 6144]
    assert layout.groups(2, 1) == [range(0, 1), range(1, 2), range(2, 3)]  # one layer at least
    assert layout.groups(2, 12 << 10) == [range(0, 2), range(2, 3)]
    assert layout.groups(1, 1 << 20) == [range(0, 3)]
    assert layout.span(2, range(1, 3)) == (2 * 2048, 2 * (2048 + 4096 + 6144))


def test_block_dim_is_found_from_num_blocks() -> None:
    layout = KVLayout({"l": torch.zeros(2, NUM_BLOCKS, 16, 2, 32)}, NUM_BLOCKS)
    assert layout.layers[0].block_dim == 1
    with pytest.raises(ValueError, match="num_blocks=7"):
        KVLayout({"l": torch.zeros(2, NUM_BLOCKS, 16)}, 7)


def test_load_rejects_records_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="records shape"):
        copier(caches("cpu")).load_now([0], np.zeros((1, 3), dtype=np.uint8))


def test_staging_pool_is_bounded_saves_take_half_and_loads_wait_then_time_out() -> None:
    layout = KVLayout(caches("cpu"), NUM_BLOCKS)
    pool = StagingPool(layout.block_bytes, 4 * 2 * (layout.block_bytes + 8) + 8, 2 * layout.block_bytes, pin=False,
                       wait_s=0.2)
    assert (pool.count, pool.chunk_blocks, pool.save_limit) == (4, 2, 2)
    saves = pool.try_acquire_for_save(3)
    assert len(saves) == 2 and pool.try_acquire_for_save(1) == []  # saves never take more than half
    loads = pool.acquire(5)
    assert len(loads) == 2 and pool.in_use == 4  # what was free, never more than the pool
    with pytest.raises(StagingTimeout):
        pool.acquire(1)
    assert pool.waits == 1 and pool.timeouts == 1
    pool.release(saves)
    assert len(pool.try_acquire_for_save(2)) == 2
    with pytest.raises(ConfigError, match="connector.staging_bytes"):
        StagingPool(layout.block_bytes, layout.block_bytes, layout.block_bytes, pin=False)


@pytest.mark.parametrize("layout", ["cpu", "flash", "mixed"])
def test_direct_loads_write_host_blocks_like_the_staged_path(layout: str) -> None:
    """Contiguous host KV caches take loaded records straight into their blocks (the placer, in parallel); the
    bytes are those the staged path writes, and what the placer yields is the record, in order."""
    from concurrent.futures import ThreadPoolExecutor

    from kvtier.connector.loading import StagedLoads
    from kvtier.transfer import FenceWatcher

    src = caches(layout)
    dim = block_dim(layout)
    ids = [4, 1, 5, 0, 2]
    records = copier(src).save_now(ids)
    staged = {name: torch.zeros_like(t) for name, t in src.items()}
    copier(staged).load_now([0, 5, 3, 1, 2], records)
    direct = {name: torch.zeros_like(t) for name, t in src.items()}
    cp = copier(direct)
    assert cp.direct and cp.layout.host_rows is not None
    place = StagedLoads(cp, FenceWatcher()).placer([0, 5, 3, 1, 2])
    with ThreadPoolExecutor(2) as pool:
        landed = list(pool.map(lambda i: b"".join(bytes(part) for part in place(i, bytes(records[i]))), range(5)))
    assert landed == [bytes(r) for r in records]
    for name in src:
        assert torch.equal(direct[name], staged[name])
        assert torch.equal(direct[name].select(dim, 3), src[name].select(dim, 5))
    with pytest.raises(ValueError, match="bytes for a block"):
        list(cp.layout.place_block(0, b"\0" * 7))
    before = {name: t.clone() for name, t in direct.items()}
    for bad in (-1, cp.layout.num_blocks):  # never wraps round, never spills into the next row of blocks
        with pytest.raises(IndexError, match="outside the KV caches"):
            list(cp.layout.place_block(bad, bytes(records[0])))
    assert all(torch.equal(direct[name], before[name]) for name in direct)
    # Saves the same way: blocks straight into records, the bytes the staged path gives.
    out = np.empty((len(ids), cp.layout.block_bytes), dtype=np.uint8)
    copier(src).layout.read_blocks(ids, out)
    assert [bytes(r) for r in out] == [bytes(r) for r in records]


def test_permuted_or_device_like_views_keep_the_staged_path() -> None:
    assert KVLayout(caches("permuted"), NUM_BLOCKS).host_rows is None
    assert not copier(caches("cpu"), "buffered").direct


def test_the_worker_keeps_freed_memory_on_glibc_and_can_be_told_not_to() -> None:
    import platform

    from kvtier.hostmem import keep_freed_memory

    assert keep_freed_memory(0) is False  # 0: the allocator is left alone
    if platform.libc_ver()[0] == "glibc":
        assert keep_freed_memory(256 << 20) is True


_HEAP_PROBE = """
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(4 << 20)
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        print(lo <= block < hi)
        break
else:
    print(False)
"""


def test_glibc_tunables_give_a_new_process_the_workers_allocator_settings() -> None:
    """A 4 MiB block comes from a fresh mmap with glibc's defaults and from the heap with kvtier's settings: what
    the benchmarks rely on to start plain vLLM with the allocator kvtier's worker gives its process."""
    import os
    import platform
    import subprocess
    import sys

    from kvtier.hostmem import glibc_tunables

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc tunables only")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}

    def from_heap(extra: dict[str, str]) -> str:
        return subprocess.run([sys.executable, "-c", _HEAP_PROBE], env={**env, **extra}, capture_output=True,
                              text=True, check=True).stdout.strip()

    assert from_heap({}) == "False"
    assert from_heap({"GLIBC_TUNABLES": glibc_tunables(256 << 20)}) == "True"


def test_runs_map_keeps_order_in_one_contiguous_run_per_thread() -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from kvtier.connector.loading import runs_map

    jobs: list[int] = []

    class Counting(ThreadPoolExecutor):
        def map(self, fn, *iterables, **kwargs):  # type: ignore[no-untyped-def]
            runs = list(iterables[0])
            jobs.append(len(runs))
            return super().map(fn, runs, **kwargs)

    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def job(x: int) -> int:
        with lock:
            seen.append((threading.get_ident(), x))
        return x * x

    with Counting(3) as pool:
        assert runs_map(pool, 3, job, range(10)) == [x * x for x in range(10)]
        assert jobs == [3] and sorted(x for _, x in seen) == list(range(10))  # three jobs, each item once
        for thread in {t for t, _ in seen}:  # each job's items in order
            mine = [x for t, x in seen if t == thread]
            assert mine == sorted(mine)
        seen.clear()
        assert runs_map(pool, 3, job, [5]) == [25] and seen == [(threading.get_ident(), 5)]  # one item: inline
        assert runs_map(pool, 3, job, []) == [] and jobs == [3]
