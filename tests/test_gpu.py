"""The CUDA path: staging pinned and allocated once, copies on side streams ordered with the compute stream by
events, saves that never block the step, delayed release and preemption fences on the device, layer-wise and
async loads, a pinned DRAM tier, the worker's save -> load round trip on a flash-attention layout.

Marked ``gpu`` and skipped where ``torch.cuda.is_available()`` is false. To check the test logic itself on a
CPU-only machine, ``KVTIER_GPU_TESTS_ON_CPU=1`` runs them on CPU tensors (pinning and timing assertions are
skipped there). Nothing here imports vLLM (scripts/gpu-check.sh runs this file where vLLM is not installed).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kvtier.config import KVTierConfig
from kvtier.connector.metadata import KVTierMetadata, LoadSpec
from kvtier.connector.worker import WorkerSide
from kvtier.tiers.stack import TierStack
from kvtier.transfer import KVCopier, KVLayout, StagingPool

ON_CPU = os.environ.get("KVTIER_GPU_TESTS_ON_CPU") == "1" and not torch.cuda.is_available()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() and not ON_CPU, reason="needs CUDA")]
cuda_only = pytest.mark.skipif(ON_CPU, reason="timing and stream ordering need a real device")

DEVICE = "cpu" if ON_CPU else "cuda"
PIN = "never" if ON_CPU else "always"
LAYERS, NUM_BLOCKS, BLOCK, HEADS, HEAD = 3, 48, 16, 4, 64
LAYER_BLOCK_BYTES = 2 * BLOCK * HEADS * HEAD * 2  # K and V of one block of one layer, bf16


def flash_caches(seed: int = 0, zeros: bool = False) -> dict[str, torch.Tensor]:
    """Per-layer flash-attention KV tensors ``[2, num_blocks, block_size, kv_heads, head_size]`` on the device."""
    gen = torch.Generator().manual_seed(seed)
    shape = (2, NUM_BLOCKS, BLOCK, HEADS, HEAD)
    return {f"model.layers.{i}.self_attn.attn":
            (torch.zeros(shape) if zeros else torch.randn(shape, generator=gen)).to(torch.bfloat16).to(DEVICE)
            for i in range(LAYERS)}


def reference_rows(caches: dict[str, torch.Tensor], block_ids: list[int]) -> np.ndarray:
    """What a block's bytes must be, computed on the host independently of kvtier: each layer's K and V of that
    block, layers in registration order."""
    return np.stack([torch.cat([kv[:, b].cpu().contiguous().view(torch.uint8).flatten() for kv in caches.values()])
                     .numpy() for b in block_ids])


def copier(caches: dict[str, torch.Tensor], chunk_blocks: int = 4) -> KVCopier:
    layout = KVLayout(caches, NUM_BLOCKS)
    pool = StagingPool(layout.block_bytes, 1 << 22, chunk_blocks * layout.block_bytes, pin=layout.is_cuda)
    return KVCopier(layout, pool)


def worker(tmp_path: Path, caches: dict[str, torch.Tensor], **connector: Any) -> WorkerSide:
    cfg = KVTierConfig.from_dict({"tiers": [
        {"kind": "dram", "capacity": "2MiB", "page_size": "16KiB", "pin_memory": PIN},
        {"kind": "disk", "capacity": "8MiB", "path": str(tmp_path / "disk")},
    ], "connector": {"staging_bytes": "4MiB", "staging_chunk_bytes": "256KiB", **connector}}, env={})
    side = WorkerSide(cfg, NUM_BLOCKS)
    side.register_kv_caches(caches)
    return side


def slow_compute_work() -> None:
    """Tens of milliseconds queued on the current (compute) stream."""
    big = torch.randn(256 if ON_CPU else 4096, 256 if ON_CPU else 4096, device=DEVICE)
    for _ in range(2 if ON_CPU else 20):
        big = big @ big / 64


def test_layout_finds_the_block_dimension_of_a_flash_layout() -> None:
    caches = flash_caches()
    for layout in (KVLayout(caches, NUM_BLOCKS), KVLayout(caches)):  # with and without the block count
        assert [layer.block_dim for layer in layout.layers] == [1] * LAYERS
        assert layout.layers[0].block_shape == (2, BLOCK, HEADS, HEAD)
        assert layout.block_bytes == LAYERS * LAYER_BLOCK_BYTES
        assert layout.is_cuda == (DEVICE == "cuda")


def test_saves_copy_exact_bytes_through_pinned_staging_and_loads_write_only_their_blocks() -> None:
    src, dst = flash_caches(seed=1), flash_caches(zeros=True)
    out = copier(src)
    assert out.pool.pinned == (not ON_CPU) and (ON_CPU or out.pool._memory.is_pinned())
    ids = [5, 0, 17, 47, 3, 9, 30]  # unsorted, first and last block, two chunks
    records = out.save_now(ids)
    assert np.array_equal(records, reference_rows(src, ids))
    copier(dst).load_now([40, 1, 7, 2, 3, 4, 5], records)
    for name in src:
        for s, d in zip(ids, [40, 1, 7, 2, 3, 4, 5]):
            assert torch.equal(dst[name][:, d], src[name][:, s])
        untouched = [b for b in range(NUM_BLOCKS) if b not in (40, 1, 7, 2, 3, 4, 5)]
        assert not dst[name][:, untouched].any()


def test_a_save_sees_writes_still_queued_on_the_compute_stream() -> None:
    caches = flash_caches()
    out = copier(caches)
    # Queue slow work on the compute stream, then writes; copy at once without synchronising: the save stream
    # must wait for them, or it would copy stale values.
    slow_compute_work()
    for kv in caches.values():
        kv.mul_(0).add_(7.0)
    records = out.save_now([3, 11])
    assert np.array_equal(records, reference_rows(caches, [3, 11]))
    assert (torch.from_numpy(records).view(torch.bfloat16) == 7.0).all()


def test_no_device_or_pinned_memory_is_allocated_per_step(tmp_path: Path) -> None:
    caches = flash_caches(seed=5)
    side = worker(tmp_path, caches)
    keys = [bytes([i]) * 16 for i in range(1, 9)]

    def one_round() -> None:
        side.wait_for_save(KVTierMetadata(saves=[(k, i) for i, k in enumerate(keys)], save_reqs=["r"]))
        side.drain()
        side.start_load_kv(KVTierMetadata(loads=[LoadSpec("r", keys, list(range(20, 28)))]))
        side.wait_for_save(KVTierMetadata())
    one_round()  # warm-up (CUDA context, kernels)
    if not ON_CPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    for _ in range(5):
        one_round()
    if not ON_CPU:
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before
        # No device temporaries as large as a layer's part of the copied blocks (8 x 32 KiB here).
        assert torch.cuda.max_memory_allocated() - before < 64 << 10
    side.shutdown()


@cuda_only
def test_wait_for_save_returns_before_the_copy_and_release_waits_for_it(tmp_path: Path) -> None:
    caches = flash_caches(seed=6)
    side = worker(tmp_path, caches)
    side.wait_for_save(KVTierMetadata(saves=[(b"w" * 16, 40)]))  # warm-up: kernels loaded
    side.drain()
    expected = reference_rows(caches, list(range(8)))
    slow_compute_work()  # the forward still running on the device
    start = time.perf_counter()
    side.wait_for_save(KVTierMetadata(saves=[(bytes([i + 1]) * 16, i) for i in range(8)], save_reqs=["a"]))
    issued = time.perf_counter() - start
    assert side.saver is not None and side.saver.in_flight() == 1  # still copying: the step did not wait
    assert side.get_finished({"a"}, KVTierMetadata(release_after_saves=["a"])) == (None, None)
    assert issued < 0.02, f"wait_for_save took {issued * 1e3:.1f} ms"
    torch.cuda.synchronize()
    assert side.get_finished(set(), KVTierMetadata()) == ({"a"}, None)
    side.drain()
    got = side.stack.get(bytes([8]) * 16)
    assert got is not None and bytes(got[0]) == expected[7].tobytes()
    side.shutdown()


@cuda_only
def test_a_preemption_fence_keeps_reused_blocks_intact_until_their_copy_is_done(tmp_path: Path) -> None:
    caches = flash_caches(seed=7)
    side = worker(tmp_path, caches)
    expected = reference_rows(caches, list(range(8)))
    slow_compute_work()
    side.wait_for_save(KVTierMetadata(saves=[(bytes([i + 1]) * 16, i) for i in range(8)], save_reqs=["a"]))
    side.handle_preemptions(KVTierMetadata(preempted=["a"]))  # "a" was preempted: its blocks go to others
    for kv in caches.values():  # the next forward rewrites them on the compute stream
        kv[:, 0:8].fill_(-1.0)
    side.drain()
    for i in range(8):
        got = side.stack.get(bytes([i + 1]) * 16)
        assert got is not None and bytes(got[0]) == expected[i].tobytes()
    side.shutdown()


@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layerwise"])
def test_loaded_blocks_are_visible_to_the_compute_stream(tmp_path: Path, layerwise: bool) -> None:
    caches = flash_caches(seed=2)
    side = worker(tmp_path, caches, layerwise_load=layerwise)
    original = {name: kv.clone() for name, kv in caches.items()}
    keys = [bytes([i + 1]) * 16 for i in range(8)]
    side.wait_for_save(KVTierMetadata(saves=[(k, i) for i, k in enumerate(keys)]))
    side.drain()
    slow_compute_work()
    side.start_load_kv(KVTierMetadata(loads=[LoadSpec("r", keys, list(range(8, 16)))]))
    # Read them on the compute stream right away (what the attention kernels do), layer by layer.
    for name in caches:
        side.wait_for_layer_load(name)
        total = caches[name][:, 8:16].float().sum()
        assert torch.allclose(total, original[name][:, 0:8].float().sum())
    side.wait_for_save(KVTierMetadata())
    side.shutdown()


def test_an_async_load_lands_before_it_is_reported(tmp_path: Path) -> None:
    caches = flash_caches(seed=3)
    side = worker(tmp_path, caches)
    original = {name: kv.clone() for name, kv in caches.items()}
    keys = [bytes([i + 1]) * 16 for i in range(6)]
    side.wait_for_save(KVTierMetadata(saves=[(k, i) for i, k in enumerate(keys)]))
    side.drain()
    side.start_load_kv(KVTierMetadata(loads=[LoadSpec("r", keys, list(range(30, 36)), is_async=True)]))
    deadline, done = time.monotonic() + 10, None
    while not done and time.monotonic() < deadline:
        done = side.get_finished(set())[1]
    assert done == {"r"} and side.take_load_errors() == set()
    for name in caches:  # no synchronisation: reported means on the device
        assert torch.equal(caches[name][:, 30:36], original[name][:, 0:6])
    side.shutdown()


def test_pinned_dram_tier_round_trip_through_the_stack(tmp_path: Path) -> None:
    cfg = KVTierConfig.from_dict({"tiers": [
        {"kind": "dram", "capacity": "256KiB", "page_size": "16KiB", "pin_memory": PIN},
        {"kind": "disk", "capacity": "8MiB", "path": str(tmp_path / "disk"), "codec": {"name": "lz4", "shuffle": True}},
    ]}, env={})
    stack = TierStack.from_config(cfg)
    dram = stack.tiers[0]
    assert dram.pinned == (not ON_CPU)  # type: ignore[attr-defined]
    assert ON_CPU or dram._pool.is_pinned()  # type: ignore[attr-defined]
    src, dst = flash_caches(seed=3), flash_caches(zeros=True)
    # 1. Twelve 48 KiB blocks (64 KiB of DRAM pages each) out of the device into a 256 KiB pinned DRAM tier:
    #    the first eight spill to disk.
    records = copier(src).save_now(list(range(12)))
    keys = [i.to_bytes(16, "little") for i in range(12)]
    for i, key in enumerate(keys):
        assert stack.put(key, memoryview(records[i]))
    assert {stack.where(k) for k in keys} == {"dram", "disk"}
    # 2. Back from whichever tier holds each block into different device blocks, byte for byte.
    back = np.stack([np.frombuffer(bytes(found[0]), dtype=np.uint8) for found in map(stack.get, keys)
                     if found is not None])
    copier(dst).load_now(list(range(20, 32)), back)
    for name in src:
        assert torch.equal(dst[name][:, 20:32], src[name][:, 0:12])
    stack.close()


def test_worker_saves_and_loads_device_blocks(tmp_path: Path) -> None:
    caches = flash_caches(seed=4)
    side = worker(tmp_path, caches)
    original = {name: kv.clone() for name, kv in caches.items()}
    keys = [bytes([i]) * 16 for i in range(1, 9)]
    # 1. Save blocks 0-7 (copied out at the end of the step, stored on the worker's threads).
    side.wait_for_save(KVTierMetadata(saves=[(k, i) for i, k in enumerate(keys)]))
    side.drain()
    # 2. vLLM reuses those blocks for something else.
    for kv in caches.values():
        kv[:, 0:8].zero_()
    # 3. A later request hits: load the saved blocks into blocks 30-37, plus one block nobody stored.
    side.start_load_kv(KVTierMetadata(loads=[LoadSpec("r1", keys, list(range(30, 38))),
                                            LoadSpec("r2", [b"\xff" * 16], [40])]))
    for name, kv in caches.items():
        assert torch.equal(kv[:, 30:38], original[name][:, 0:8])
    assert side.take_load_errors() == {40}
    stats = side.stats_data() or {}
    assert stats["saved_blocks"] == 8 and stats["loaded_blocks"] == 8 and stats["load_failed_blocks"] == 1
    side.shutdown()
