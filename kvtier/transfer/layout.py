"""KVLayout: where one vLLM block lives in each layer's KV tensor, and how a chunk of blocks sits in staging memory.

A *block* is one vLLM block across every layer: the bytes of ``kv[layer].select(block_dim, id)`` (in logical
order) for each layer in registration order, concatenated. That is the record the tiers store. The block
dimension is found from the tensor shapes (the dimension whose size is the number of blocks), so the CPU
layout ``[num_blocks, heads, block, 2*head]`` and GPU layouts such as flash-attention's ``[2, num_blocks,
block, heads, head]`` (also when vLLM hands over a permuted view) work without assumptions.

A *chunk* of n blocks in staging memory is layer-major: layer i's part is one contiguous tensor shaped like
the layer's tensor with n in place of num_blocks (exactly what ``index_select`` along the block dimension
produces), at byte offset ``n * offset_i``. One device copy per layer moves it; on the host, ``unstage``
reorders a chunk into block-major records and ``stage`` writes one record into a chunk.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class LayerLayout:
    name: str
    block_dim: int
    block_shape: tuple[int, ...]  # shape of one block of this layer (block dim removed), in the tensor's dtype
    dtype: torch.dtype
    nbytes: int  # bytes of one block of this layer
    offset: int  # where this layer's bytes start in a block's record
    outer: int  # product of the dimensions before the block dimension (2 for K/V-first layouts)
    inner: int  # bytes of one block per outer index
    view_shape: tuple[int, ...]  # shape of the tensor the copies index (a byte view where possible)

    def chunk_shape(self, n: int) -> tuple[int, ...]:
        shape = list(self.view_shape)
        shape[self.block_dim] = n
        return tuple(shape)


class KVLayout:
    def __init__(self, kv_caches: Mapping[str, torch.Tensor], num_blocks: int | None = None) -> None:
        if not kv_caches:
            raise ValueError("no KV cache tensors registered")
        self.tensors = dict(kv_caches)
        block_dims = [_find_block_dim(kv, num_blocks) for kv in self.tensors.values()]
        # What copies index: every layer viewed as the widest integer type all of them allow, so any dtype (fp8
        # included) copies alike with as few elements as possible (index_copy_ is per element).
        self.views: list[torch.Tensor] = _word_views(list(self.tensors.values()), block_dims)
        self.layers: list[LayerLayout] = []
        offset = 0
        for (name, kv), block_dim, view in zip(self.tensors.items(), block_dims, self.views):
            shape = tuple(s for i, s in enumerate(kv.shape) if i != block_dim)
            nbytes = kv.element_size() * math.prod(shape)
            outer = math.prod(kv.shape[:block_dim])
            self.layers.append(LayerLayout(name, block_dim, shape, kv.dtype, nbytes, offset, outer,
                                           nbytes // outer, tuple(view.shape)))
            offset += nbytes
        self.block_bytes = offset
        self.max_layer_bytes = max(layer.nbytes for layer in self.layers)
        self.num_blocks = int(self.views[0].shape[self.layers[0].block_dim])
        # Every layer shaped alike: a chunk is one [layers, outer, n, inner] array (one host copy per chunk).
        self.uniform = len({(layer.outer, layer.inner) for layer in self.layers}) == 1
        first = next(iter(self.tensors.values()))
        self.device = first.device
        self.is_cuda = first.device.type == "cuda"
        # Host KV caches laid out contiguously: each layer as a byte array [outer, num_blocks, inner] sharing
        # the tensor's memory, so a loaded record goes straight into its block (one copy, no staging).
        self.host_rows = _host_rows(list(self.tensors.values()), self.layers, self.num_blocks)
        # The same bytes flat, for place_block's row copies: a memoryview slice and assignment cost a fraction
        # of numpy's per-call overhead, which dominated a 2k-token load (3,072 rows of 8 KiB).
        self._host_flat = None if self.host_rows is None else [
            (rows.reshape(-1).data, layer.inner,
             [(outer * self.num_blocks * layer.inner, layer.offset + outer * layer.inner) for outer in range(layer.outer)])
            for rows, layer in zip(self.host_rows, self.layers)]  # per layer: bytes, row size, (row 0, record offset)

    def describe(self) -> str:
        first = self.layers[0]
        return (f"{len(self.layers)} layers, block dim {first.block_dim}, block shape {list(first.block_shape)}, "
                f"{first.dtype}, {self.block_bytes} bytes per block, device {self.device}")

    # ---- staging geometry ---------------------------------------------------------------------------
    def section(self, data: torch.Tensor, n: int, index: int, base: int = 0) -> torch.Tensor:
        """Layer ``index``'s part of a chunk of ``n`` blocks staged in the flat uint8 tensor ``data`` (which
        starts at the chunk's layer whose offset is ``base``)."""
        layer = self.layers[index]
        start = n * (layer.offset - base)
        part = data[start:start + n * layer.nbytes]
        return part.view(self.views[index].dtype).view(layer.chunk_shape(n))

    def groups(self, n: int, max_bytes: int) -> list[range]:
        """Consecutive layers whose parts of a chunk of ``n`` blocks add up to at most ``max_bytes`` (at least one
        layer each): contiguous in a chunk, so each group moves in one copy."""
        groups: list[range] = []
        start, size = 0, 0
        for i, layer in enumerate(self.layers):
            if i > start and size + n * layer.nbytes > max_bytes:
                groups.append(range(start, i))
                start, size = i, 0
            size += n * layer.nbytes
        groups.append(range(start, len(self.layers)))
        return groups

    def span(self, n: int, group: range) -> tuple[int, int]:
        """Byte range of a group of layers in a chunk of ``n`` blocks."""
        first, last = self.layers[group[0]], self.layers[group[-1]]
        return n * first.offset, n * (last.offset + last.nbytes)

    def unstage(self, data: np.ndarray, n: int, out: np.ndarray) -> None:
        """Block-major records ``out[n, block_bytes]`` from a chunk of ``n`` blocks staged in ``data``."""
        if self.uniform:
            first = self.layers[0]
            chunk = data[:n * self.block_bytes].reshape(len(self.layers), first.outer, n, first.inner)
            out.reshape(n, len(self.layers), first.outer, first.inner)[:] = chunk.transpose(2, 0, 1, 3)
            return
        for layer in self.layers:
            part = data[n * layer.offset:n * (layer.offset + layer.nbytes)].reshape(layer.outer, n, layer.inner)
            out[:, layer.offset:layer.offset + layer.nbytes].reshape(n, layer.outer, layer.inner)[:] = \
                part.transpose(1, 0, 2)

    def stage(self, data: np.ndarray, n: int, i: int, record: np.ndarray) -> None:
        """Write one block's record (``block_bytes`` uint8) as block ``i`` of a chunk of ``n`` in ``data``."""
        if self.uniform:
            first = self.layers[0]
            chunk = data[:n * self.block_bytes].reshape(len(self.layers), first.outer, n, first.inner)
            chunk[:, :, i, :] = record.reshape(len(self.layers), first.outer, first.inner)
            return
        for layer in self.layers:
            part = data[n * layer.offset:n * (layer.offset + layer.nbytes)].reshape(layer.outer, n, layer.inner)
            part[:, i, :] = record[layer.offset:layer.offset + layer.nbytes].reshape(layer.outer, layer.inner)

    def place_block(self, block_id: int, raw: bytes | bytearray | memoryview) -> Iterator[memoryview]:
        """Copy one record straight into block ``block_id`` of every layer (``host_rows`` only), yielding each
        part of the block right after writing it (in record order, while it is still in cache): a caller
        checksums what landed. Blocks are disjoint: threads may place different blocks at once."""
        if self._host_flat is None:
            raise RuntimeError("direct block writes need contiguous host KV caches")
        src = memoryview(raw).cast("B")
        if len(src) != self.block_bytes:
            raise ValueError(f"record of {len(src)} bytes for a block of {self.block_bytes}")
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block {block_id} outside the KV caches' {self.num_blocks} blocks")
        for flat, inner, parts in self._host_flat:
            for first, begin in parts:
                start = first + block_id * inner
                row = flat[start:start + inner]
                row[:] = src[begin:begin + inner]
                yield row

    def read_blocks(self, block_ids: Sequence[int], out: np.ndarray) -> None:
        """Block ``block_ids[i]`` of every layer into ``out[i]`` (a record; ``host_rows`` only): one copy."""
        if self.host_rows is None:
            raise RuntimeError("direct block reads need contiguous host KV caches")
        for record, block_id in zip(out, block_ids):
            for layer, rows in zip(self.layers, self.host_rows):
                record[layer.offset:layer.offset + layer.nbytes].reshape(layer.outer, layer.inner)[:] = \
                    rows[:, block_id, :]


def _host_rows(tensors: list[torch.Tensor], layers: list[LayerLayout], num_blocks: int) -> list[np.ndarray] | None:
    """Each CPU tensor's bytes as [outer, num_blocks, inner] (a view), or None unless every tensor allows it."""
    rows: list[np.ndarray] = []
    for kv, layer in zip(tensors, layers):
        if kv.device.type != "cpu" or not kv.is_contiguous() or kv.shape[layer.block_dim] != num_blocks:
            return None
        try:
            flat = kv.reshape(-1).view(torch.uint8).numpy()
        except (RuntimeError, TypeError):  # e.g. a dtype numpy cannot view
            return None
        rows.append(flat.reshape(layer.outer, num_blocks, layer.inner))
    return rows


def _word_views(tensors: list[torch.Tensor], block_dims: list[int]) -> list[torch.Tensor]:
    """Each tensor viewed as int64, int32, int16 or uint8: the widest that every tensor allows (its last dim is
    contiguous, holds whole words and is not the block dim; each layer's block bytes are whole words). A
    tensor that allows none is used as it is."""
    def view(kv: torch.Tensor, block_dim: int, dtype: torch.dtype) -> torch.Tensor | None:
        if block_dim == kv.dim() - 1 or kv.stride(-1) != 1:
            return None
        try:
            return kv.view(dtype)
        except RuntimeError:
            return None
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        views = [view(kv, dim, dtype) for kv, dim in zip(tensors, block_dims)]
        if all(v is not None for v in views):
            return [v for v in views if v is not None]
    return [kv if (v := view(kv, dim, torch.uint8)) is None else v for kv, dim in zip(tensors, block_dims)]


def _find_block_dim(kv: torch.Tensor, num_blocks: int | None) -> int:
    if num_blocks is not None:
        for dim, size in enumerate(kv.shape):
            if size == num_blocks:
                return dim
        raise ValueError(f"KV tensor of shape {list(kv.shape)} has no dimension of size num_blocks={num_blocks}")
    # Without a block count: a leading K/V pair dimension of size 2 means blocks are next.
    return 1 if kv.dim() >= 5 and kv.shape[0] == 2 else 0
