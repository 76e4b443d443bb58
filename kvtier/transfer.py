"""Copies between vLLM's paged KV tensors and host memory. The only module that touches CUDA streams.

A *block* here is one vLLM block across every layer: the bytes of ``kv[layer].select(block_dim, id)`` for
each layer in registration order, concatenated. The block dimension is found from the tensor shapes (the
dimension whose size is the number of blocks), so the CPU layout ``[num_blocks, heads, block, 2*head]`` and
GPU layouts such as flash-attention's ``[2, num_blocks, block, heads, head]`` both work without assumptions.

On CUDA, gathers run on a side stream into a pinned host buffer (non_blocking) and are synchronised before
the data is used; scatters go host (pinned) -> device on the side stream and the compute stream waits on
them. On CPU the same code runs with plain tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerLayout:
    name: str
    block_dim: int
    block_shape: tuple[int, ...]  # shape of one block of this layer, block dim removed
    dtype: torch.dtype
    nbytes: int  # bytes of one block of this layer


class KVLayout:
    def __init__(self, kv_caches: Mapping[str, torch.Tensor], num_blocks: int | None = None) -> None:
        if not kv_caches:
            raise ValueError("no KV cache tensors registered")
        self.tensors = dict(kv_caches)
        self.layers: list[LayerLayout] = []
        for name, kv in self.tensors.items():
            block_dim = _find_block_dim(kv, num_blocks)
            shape = tuple(s for i, s in enumerate(kv.shape) if i != block_dim)
            nbytes = kv.element_size() * int(torch.Size(shape).numel())
            self.layers.append(LayerLayout(name, block_dim, shape, kv.dtype, nbytes))
        self.block_bytes = sum(layer.nbytes for layer in self.layers)
        first = next(iter(self.tensors.values()))
        self.device = first.device
        self.is_cuda = first.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self.device) if self.is_cuda else None

    def describe(self) -> str:
        first = self.layers[0]
        return (f"{len(self.layers)} layers, block dim {first.block_dim}, block shape {list(first.block_shape)}, "
                f"{first.dtype}, {self.block_bytes} bytes per block, device {self.device}")

    def host_buffer(self, n: int) -> torch.Tensor:
        return torch.empty((n, self.block_bytes), dtype=torch.uint8, pin_memory=self.is_cuda)

    def gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Copy blocks out into a new host tensor ``[len(block_ids), block_bytes]`` (complete on return)."""
        host = self.host_buffer(len(block_ids))
        if not block_ids:
            return host
        if not self.is_cuda and all(layer.block_dim == 0 for layer in self.layers):
            self._copy_rows(block_ids, host, out=True)
            return host
        idx = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
        ctx = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with ctx:
            if self._stream is not None:
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
            offset = 0
            for layer in self.layers:
                sel = self.tensors[layer.name].index_select(layer.block_dim, idx)
                flat = sel.movedim(layer.block_dim, 0).contiguous().view(torch.uint8).reshape(len(block_ids), -1)
                host[:, offset:offset + layer.nbytes].copy_(flat, non_blocking=self.is_cuda)
                offset += layer.nbytes
        if self._stream is not None:
            self._stream.synchronize()
        return host

    def scatter(self, block_ids: Sequence[int], host: torch.Tensor) -> None:
        """Copy ``host[i]`` into block ``block_ids[i]`` of every layer (visible to the compute stream on return)."""
        if not block_ids:
            return
        if host.shape != (len(block_ids), self.block_bytes):
            raise ValueError(f"host buffer shape {tuple(host.shape)} != ({len(block_ids)}, {self.block_bytes})")
        if not self.is_cuda and all(layer.block_dim == 0 for layer in self.layers):
            self._copy_rows(block_ids, host, out=False)
            return
        idx = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
        ctx = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with ctx:
            src = host.to(self.device, non_blocking=True) if self.is_cuda else host
            offset = 0
            for layer in self.layers:
                chunk = src[:, offset:offset + layer.nbytes].contiguous().view(layer.dtype)
                chunk = chunk.reshape(len(block_ids), *layer.block_shape).movedim(0, layer.block_dim)
                self.tensors[layer.name].index_copy_(layer.block_dim, idx, chunk)
                offset += layer.nbytes
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            self._stream.synchronize()

    def _copy_rows(self, block_ids: Sequence[int], host: torch.Tensor, out: bool) -> None:
        """CPU fast path for block-major layouts: one memcpy per block and layer, no temporaries."""
        buffer = host.numpy()
        offset = 0
        for layer in self.layers:
            kv = self.tensors[layer.name]
            rows = kv.view(torch.uint8).reshape(kv.shape[0], -1).numpy()  # shares memory with the cache
            end = offset + layer.nbytes
            for i, block_id in enumerate(block_ids):
                if out:
                    buffer[i, offset:end] = rows[block_id]
                else:
                    rows[block_id] = buffer[i, offset:end]
            offset = end


def _find_block_dim(kv: torch.Tensor, num_blocks: int | None) -> int:
    if num_blocks is not None:
        for dim, size in enumerate(kv.shape):
            if size == num_blocks:
                return dim
        raise ValueError(f"KV tensor of shape {list(kv.shape)} has no dimension of size num_blocks={num_blocks}")
    # Without a block count: a leading K/V pair dimension of size 2 means blocks are next.
    return 1 if kv.dim() >= 5 and kv.shape[0] == 2 else 0

