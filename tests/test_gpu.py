"""The CUDA path: KVLayout gather/scatter on a flash-attention layout, side-stream ordering, a pinned DRAM tier,
and the worker's save -> load round trip on device tensors.

Marked ``gpu`` and skipped where ``torch.cuda.is_available()`` is false. To check the test logic itself on a
CPU-only machine, ``KVTIER_GPU_TESTS_ON_CPU=1`` runs them on CPU tensors (pinning assertions are skipped there).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kvtier.config import KVTierConfig
from kvtier.connector.metadata import KVTierMetadata, LoadSpec
from kvtier.connector.worker import WorkerSide
from kvtier.tiers.stack import TierStack
from kvtier.transfer import KVLayout

ON_CPU = os.environ.get("KVTIER_GPU_TESTS_ON_CPU") == "1" and not torch.cuda.is_available()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() and not ON_CPU, reason="needs CUDA")]

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


def reference_rows(caches: dict[str, torch.Tensor], block_ids: list[int]) -> torch.Tensor:
    """What a block's bytes must be, computed on the host independently of KVLayout: each layer's K and V
    of that block, layers in registration order."""
    rows = []
    for b in block_ids:
        rows.append(torch.cat([kv[:, b].cpu().contiguous().view(torch.uint8).flatten() for kv in caches.values()]))
    return torch.stack(rows)


def assert_pinned(t: torch.Tensor) -> None:
    if not ON_CPU:
        assert t.is_pinned()


def test_layout_finds_the_block_dimension_of_a_flash_layout() -> None:
    caches = flash_caches()
    for layout in (KVLayout(caches, NUM_BLOCKS), KVLayout(caches)):  # with and without the block count
        assert [layer.block_dim for layer in layout.layers] == [1] * LAYERS
        assert layout.layers[0].block_shape == (2, BLOCK, HEADS, HEAD)
        assert layout.block_bytes == LAYERS * LAYER_BLOCK_BYTES
        assert layout.is_cuda == (DEVICE == "cuda")


def test_gather_copies_exact_bytes_into_pinned_host_memory() -> None:
    caches = flash_caches()
    layout = KVLayout(caches, NUM_BLOCKS)
    ids = [5, 0, 17, 47, 3]  # unsorted, first and last block included
    host = layout.gather(ids)
    assert host.device.type == "cpu" and host.shape == (len(ids), layout.block_bytes)
    assert_pinned(host)
    assert torch.equal(host, reference_rows(caches, ids))
    assert layout.gather([]).shape == (0, layout.block_bytes)


def test_scatter_writes_only_the_target_blocks() -> None:
    src, dst = flash_caches(seed=1), flash_caches(zeros=True)
    host = KVLayout(src, NUM_BLOCKS).gather([2, 9, 30])
    KVLayout(dst, NUM_BLOCKS).scatter([40, 1, 7], host)
    for name in src:
        for s, d in ((2, 40), (9, 1), (30, 7)):
            assert torch.equal(dst[name][:, d], src[name][:, s])
        untouched = [b for b in range(NUM_BLOCKS) if b not in (40, 1, 7)]
        assert not dst[name][:, untouched].any()
    with pytest.raises(ValueError, match="host buffer shape"):
        KVLayout(dst, NUM_BLOCKS).scatter([1, 2], host)


def test_gather_sees_writes_still_queued_on_the_compute_stream() -> None:
    caches = flash_caches()
    layout = KVLayout(caches, NUM_BLOCKS)
    # Queue slow work on the current (compute) stream, then gather at once without synchronising: the side
    # stream must wait for it, or it would copy stale values.
    for kv in caches.values():
        big = torch.randn(256 if ON_CPU else 2048, 256 if ON_CPU else 2048, device=DEVICE)
        for _ in range(4):
            big = big @ big
        kv.mul_(0).add_(7.0)
    host = layout.gather([3, 11])
    assert torch.equal(host, reference_rows(caches, [3, 11]))
    assert (host.view(torch.bfloat16) == 7.0).all()


def test_scattered_blocks_are_visible_to_the_compute_stream() -> None:
    src, dst = flash_caches(seed=2), flash_caches(zeros=True)
    host = KVLayout(src, NUM_BLOCKS).gather(list(range(8)))
    KVLayout(dst, NUM_BLOCKS).scatter(list(range(8, 16)), host)
    # Read them on the compute stream right away (what the next attention kernel does).
    for name in src:
        total = dst[name][:, 8:16].float().sum()
        assert torch.allclose(total, src[name][:, 0:8].float().sum())


def test_pinned_dram_tier_round_trip_through_the_stack(tmp_path: Path) -> None:
    cfg = KVTierConfig.from_dict({"tiers": [
        {"kind": "dram", "capacity": "256KiB", "page_size": "16KiB", "pin_memory": PIN},
        {"kind": "disk", "capacity": "8MiB", "path": str(tmp_path / "disk"), "codec": {"name": "lz4", "shuffle": True}},
    ]}, env={})
    stack = TierStack.from_config(cfg)
    dram = stack.tiers[0]
    assert dram.pinned == (not ON_CPU)  # type: ignore[attr-defined]
    assert_pinned(dram._pool)  # type: ignore[attr-defined]
    src, dst = flash_caches(seed=3), flash_caches(zeros=True)
    layout_src, layout_dst = KVLayout(src, NUM_BLOCKS), KVLayout(dst, NUM_BLOCKS)
    # 1. Twelve 48 KiB blocks (64 KiB of DRAM pages each) out of the device into a 256 KiB pinned DRAM tier:
    #    the first eight spill to disk.
    host = layout_src.gather(list(range(12)))
    keys = [i.to_bytes(16, "little") for i in range(12)]
    for i, key in enumerate(keys):
        assert stack.put(key, memoryview(host[i].numpy()))
    assert {stack.where(k) for k in keys} == {"dram", "disk"}
    # 2. Back from whichever tier holds each block into different device blocks, byte for byte.
    back = layout_dst.host_buffer(12)
    assert_pinned(back)
    for i, key in enumerate(keys):
        got = stack.get(key)
        assert got is not None
        back[i].copy_(torch.frombuffer(bytearray(got[0]), dtype=torch.uint8))
    layout_dst.scatter(list(range(20, 32)), back)
    for name in src:
        assert torch.equal(dst[name][:, 20:32], src[name][:, 0:12])
    stack.close()


def test_worker_saves_and_loads_device_blocks(tmp_path: Path) -> None:
    cfg = KVTierConfig.from_dict({"tiers": [
        {"kind": "dram", "capacity": "1MiB", "page_size": "16KiB", "pin_memory": PIN},
        {"kind": "disk", "capacity": "8MiB", "path": str(tmp_path / "disk")},
    ]}, env={})
    worker = WorkerSide(cfg, NUM_BLOCKS)
    caches = flash_caches(seed=4)
    worker.register_kv_caches(caches)
    original = {name: kv.clone() for name, kv in caches.items()}
    keys = [bytes([i]) * 16 for i in range(1, 9)]
    # 1. Save blocks 0-7 (gathered at the end of the step, stored on the worker's threads).
    worker.wait_for_save(KVTierMetadata(saves=[(k, i) for i, k in enumerate(keys)]))
    worker.drain()
    # 2. vLLM reuses those blocks for something else.
    for kv in caches.values():
        kv[:, 0:8].zero_()
    # 3. A later request hits: load the saved blocks into blocks 30-37, plus one block nobody stored.
    worker.start_load_kv(KVTierMetadata(loads=[LoadSpec("r1", keys, list(range(30, 38))),
                                              LoadSpec("r2", [b"\xff" * 16], [40])]))
    for name, kv in caches.items():
        assert torch.equal(kv[:, 30:38], original[name][:, 0:8])
    assert worker.take_load_errors() == {40}
    stats = worker.stats_data() or {}
    assert stats["saved_blocks"] == 8 and stats["loaded_blocks"] == 8 and stats["load_failed_blocks"] == 1
    worker.shutdown()
