"""KVCopier: the device side of every copy between vLLM's KV cache and the staging pool; the only code that
touches CUDA streams (with pipeline.py).

A chunk's layers move in groups of consecutive layers of up to ``COPY_BYTES`` (contiguous in staging), so each
device<->host copy is large enough to run near the bus's bandwidth. Each direction has a Pipeline: two streams
and two device buffers of that size, so the bus copy of one group overlaps the kernels of the next. Those
buffers and one small index row per staging slot are all the device memory used, allocated once.
Saves (``save``) first wait for the work already queued on the compute stream (the forward that wrote the
blocks); per chunk and group: ``index_select`` of each layer's blocks into a buffer, then one device-to-host
copy into the chunk's pinned slot. The returned fence completes with all of them.
Loads (``load``) wait for a given fence (the compute stream's work when the load was planned); group by group
across the chunks: one host-to-device copy of the group into a buffer, then ``index_copy_`` into each layer's
blocks. One fence per layer is returned (its group's); by stream order a fence covers everything the load
issued before it. The compute stream waits on them (``guard_compute``): per layer from the attention layers
(layer-wise), or on the last before the forward starts.
On CPU the same calls run plain ``index_select``/``index_copy_`` straight between the KV tensors and staging
memory, complete on return, and the fences are already done (tests pass fences that complete when told).
``buffered=True`` runs the grouped, buffered path on CPU too, without streams (tests).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from kvtier.transfer.fences import DoneFence, Fence, FenceFactory, default_fence
from kvtier.transfer.layout import KVLayout
from kvtier.transfer.pipeline import Pipeline
from kvtier.transfer.staging import Slot, StagingPool

Chunk = tuple[Slot, int]  # a slot whose ids row holds the chunk's block ids, and how many blocks it holds
COPY_BYTES = 4 << 20  # target size of one device<->host copy (a buffer's size, unless one layer needs more)


class KVCopier:
    def __init__(self, layout: KVLayout, pool: StagingPool, fences: FenceFactory | None = None,
                 buffered: bool | None = None, buffer_bytes: int | None = None) -> None:
        self.layout = layout
        self.pool = pool
        self.cuda = layout.is_cuda
        self.buffered = self.cuda if buffered is None else buffered
        self._new_fence = fences or default_fence
        # Loads and saves go straight between host KV caches and records (one copy, no staging) when copies are
        # plain and complete when issued: the CPU build, unless a fence factory emulates copies still in flight.
        self.direct = not self.buffered and fences is None and layout.host_rows is not None
        self._load_lock = threading.Lock()  # loads come from the engine thread and from async-load threads
        self.buffer_bytes = buffer_bytes or min(max(COPY_BYTES, pool.chunk_blocks * layout.max_layer_bytes),
                                                pool.slot_bytes)
        self._saves: Pipeline | None = None
        self._loads: Pipeline | None = None
        if self.buffered:
            self._saves = Pipeline(layout.device, self.buffer_bytes)
            self._loads = Pipeline(layout.device, self.buffer_bytes)
            self._dev_ids = torch.empty((pool.count, pool.chunk_blocks), dtype=torch.int64, device=layout.device)

    @property
    def device_buffer_bytes(self) -> int:
        return 4 * self.buffer_bytes + self._dev_ids.numel() * 8 if self.buffered else 0

    # ---- ordering with the compute stream -----------------------------------------------------------
    def compute_mark(self) -> Fence:
        """A fence after the work queued so far on the caller's current stream (done on CPU)."""
        if not self.cuda:
            return DoneFence()
        with torch.cuda.device(self.layout.device):
            return default_fence(torch.cuda.current_stream())

    def guard_compute(self, fence: Fence) -> None:
        """The caller's current (compute) stream waits for ``fence``; the host does not."""
        fence.guard(torch.cuda.current_stream(self.layout.device) if self.cuda else None)

    def guard_loads(self, fence: Fence) -> None:
        """Loads issued from now on wait for ``fence`` (copies out of blocks that loads may overwrite)."""
        fence.guard(self._loads.second if self._loads is not None else None)

    def loads_mark(self) -> Fence:
        """A fence after every load issued so far (done on CPU)."""
        if self._loads is None or self._loads.second is None:
            return DoneFence()
        with self._load_lock:
            return default_fence(self._loads.second)

    # ---- copies ---------------------------------------------------------------------------------------
    def save(self, chunks: Sequence[Chunk]) -> Fence:
        """Copy each chunk's blocks (ids already in its slot) out of the KV cache into the slot."""
        if self._saves is None:
            for slot, n in chunks:
                for i, view in enumerate(self.layout.views):
                    out = self.layout.section(slot.data, n, i)
                    torch.index_select(view, self.layout.layers[i].block_dim, slot.ids[:n], out=out)
            return self._new_fence(None)
        pipe = self._saves
        if pipe.first is not None:  # after the forward that wrote the blocks
            pipe.first.wait_stream(torch.cuda.current_stream(self.layout.device))
        for slot, n in chunks:
            ids = self._dev_ids[slot.index, :n]
            with pipe.on(pipe.first):
                ids.copy_(slot.ids[:n], non_blocking=True)
            for group in self.layout.groups(n, self.buffer_bytes):
                start, end = self.layout.span(n, group)
                base = self.layout.layers[group[0]].offset
                with pipe.fill() as buffer:
                    for i in group:
                        out = self.layout.section(buffer, n, i, base)
                        torch.index_select(self.layout.views[i], self.layout.layers[i].block_dim, ids, out=out)
                with pipe.drain() as buffer:
                    slot.data[start:end].copy_(buffer[:end - start], non_blocking=True)
                pipe.next()
        return self._new_fence(pipe.second)

    def load(self, chunks: Sequence[Chunk], after: Fence) -> list[Fence]:
        """Copy each staged chunk into its blocks (ids in its slot) once ``after`` is done; one fence per layer."""
        layers = self.layout.layers
        if self._loads is None:
            for slot, n in chunks:
                for i, view in enumerate(self.layout.views):
                    _put_rows(view, layers[i].block_dim, slot.ids[:n], self.layout.section(slot.data, n, i))
            fence = self._new_fence(None)
            return [fence for _ in layers]
        pipe = self._loads
        fences: list[Fence] = []
        with self._load_lock:
            after.guard(pipe.second)  # the second stream writes the blocks
            with pipe.on(pipe.second):
                for slot, n in chunks:
                    self._dev_ids[slot.index, :n].copy_(slot.ids[:n], non_blocking=True)
            # Groups of the largest chunk; a smaller chunk fits in them too.
            for group in self.layout.groups(max(n for _, n in chunks), self.buffer_bytes):
                for slot, n in chunks:
                    self._load_group(pipe, slot, n, group)
                fence = self._new_fence(pipe.second)
                fences += [fence] * len(group)
        return fences

    def _load_group(self, pipe: Pipeline, slot: Slot, n: int, group: range) -> None:
        start, end = self.layout.span(n, group)
        base = self.layout.layers[group[0]].offset
        with pipe.fill() as buffer:
            buffer[:end - start].copy_(slot.data[start:end], non_blocking=True)
        with pipe.drain() as buffer:
            ids = self._dev_ids[slot.index, :n]
            for i in group:
                part = self.layout.section(buffer, n, i, base)
                self.layout.views[i].index_copy_(self.layout.layers[i].block_dim, ids, part)
        pipe.next()

    # ---- synchronous conveniences (tools, tests, benchmarks; the connector uses save/load) -----------
    def save_now(self, block_ids: Sequence[int]) -> np.ndarray:
        """The records ``[len(block_ids), block_bytes]`` of these blocks, copied through the staging pool."""
        out = np.empty((len(block_ids), self.layout.block_bytes), dtype=np.uint8)
        for start, slot, n in self._chunked(block_ids):
            self.save([(slot, n)]).wait()
            self.layout.unstage(slot.data.numpy(), n, out[start:start + n])
            self.pool.release([slot])
        return out

    def load_now(self, block_ids: Sequence[int], records: np.ndarray) -> None:
        """Copy ``records[i]`` into block ``block_ids[i]`` through the staging pool; complete on return."""
        if records.shape != (len(block_ids), self.layout.block_bytes):
            raise ValueError(f"records shape {records.shape} != ({len(block_ids)}, {self.layout.block_bytes})")
        for start, slot, n in self._chunked(block_ids):
            data = slot.data.numpy()
            for i in range(n):
                self.layout.stage(data, n, i, records[start + i])
            fences = self.load([(slot, n)], self.compute_mark())
            fences[-1].wait()
            self.guard_compute(fences[-1])
            self.pool.release([slot])

    def _chunked(self, block_ids: Sequence[int]) -> Iterator[tuple[int, Slot, int]]:
        step = self.pool.chunk_blocks
        for start in range(0, len(block_ids), step):
            ids = list(block_ids[start:start + step])
            (slot,) = self.pool.acquire(1)
            slot.ids.numpy()[:len(ids)] = ids
            yield start, slot, len(ids)


def _put_rows(view: torch.Tensor, dim: int, ids: torch.Tensor, src: torch.Tensor) -> None:
    """``view.index_copy_(dim, ids, src)`` for CPU tensors, through numpy where the dtype allows (a memcpy per
    block instead of torch's per-element CPU kernel: about 5x faster here)."""
    if view.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        view.numpy()[(slice(None),) * dim + (ids.numpy(),)] = src.numpy()
    else:
        view.index_copy_(dim, ids, src)
