"""KVLayout gather/scatter on CPU tensors in both the CPU layout and a flash-attention layout: exact bytes."""

from __future__ import annotations

import pytest
import torch

from kvtier.transfer import KVLayout

NUM_BLOCKS = 6


def caches(layout: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shape = (NUM_BLOCKS, 2, 16, 64) if layout == "cpu" else (2, NUM_BLOCKS, 16, 2, 32)
    return {f"layers.{i}.attn": torch.randn(shape, generator=gen).to(torch.bfloat16) for i in range(3)}


@pytest.mark.parametrize("layout", ["cpu", "flash"])
def test_gather_then_scatter_moves_exact_blocks(layout: str) -> None:
    src = caches(layout)
    dst = {name: torch.zeros_like(t) for name, t in src.items()}
    block_dim = 0 if layout == "cpu" else 1
    host = KVLayout(src, NUM_BLOCKS).gather([4, 1])
    assert host.shape == (2, KVLayout(src, NUM_BLOCKS).block_bytes)
    KVLayout(dst, NUM_BLOCKS).scatter([0, 5], host)  # block 4 -> 0, block 1 -> 5
    for name in src:
        assert torch.equal(dst[name].select(block_dim, 0), src[name].select(block_dim, 4))
        assert torch.equal(dst[name].select(block_dim, 5), src[name].select(block_dim, 1))
        for untouched in (1, 2, 3, 4):
            assert not dst[name].select(block_dim, untouched).any()


def test_block_dim_is_found_from_num_blocks() -> None:
    layout = KVLayout({"l": torch.zeros(2, NUM_BLOCKS, 16, 2, 32)}, NUM_BLOCKS)
    assert layout.layers[0].block_dim == 1
    with pytest.raises(ValueError, match="num_blocks=7"):
        KVLayout({"l": torch.zeros(2, NUM_BLOCKS, 16)}, 7)


def test_scatter_rejects_wrong_buffer_shape() -> None:
    layout = KVLayout(caches("cpu"), NUM_BLOCKS)
    with pytest.raises(ValueError, match="host buffer shape"):
        layout.scatter([0], torch.zeros(1, 3, dtype=torch.uint8))
