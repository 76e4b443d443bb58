"""StagedLoads: fetched block records into the blocks vLLM allocated: through the staging pool to a device, or
straight into host KV caches (the CPU build), in parallel."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from kvtier.transfer import DoneFence, Fence, FenceWatcher, KVCopier, Slot

MapFn = Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]
DIRECT_SPLIT_BYTES = 4 << 20  # a direct load is split into parts of about this size, written in parallel


class StagedLoads:
    def __init__(self, copier: KVCopier, watcher: FenceWatcher) -> None:
        self.copier = copier
        self.pool = copier.pool
        self.layout = copier.layout
        self._watcher = watcher

    def copy(self, block_ids: Sequence[int], records: Sequence[bytes | bytearray | memoryview], after: Fence,
             map_fn: MapFn = map) -> list[Fence]:
        """Copy ``records[i]`` into block ``block_ids[i]`` once ``after`` is done, in rounds of as many staging
        chunks as are free (waiting for one while none is: back-pressure). Returns the last round's fences, one
        per layer; by stream order they cover the earlier rounds. Slots return to the pool as their round
        completes. Raises StagingTimeout; copies already issued then still complete. Host KV caches are written
        directly (complete on return), in parts spread over ``map_fn``."""
        if self.copier.direct_loads:
            per_part = max(1, DIRECT_SPLIT_BYTES // self.layout.block_bytes)
            parts = [range(i, min(i + per_part, len(block_ids))) for i in range(0, len(block_ids), per_part)]
            for _ in map_fn(lambda r: self.layout.write_blocks(block_ids[r.start:r.stop], records[r.start:r.stop]),
                            parts):
                pass
            return [DoneFence() for _ in self.layout.layers]
        per_slot = self.pool.chunk_blocks
        fences: list[Fence] = []
        pos = 0
        while pos < len(block_ids):
            slots = self.pool.acquire(-(-(len(block_ids) - pos) // per_slot))
            try:
                chunks = []
                for slot in slots:
                    n = min(per_slot, len(block_ids) - pos)
                    self._stage(slot, block_ids[pos:pos + n], records[pos:pos + n])
                    chunks.append((slot, n))
                    pos += n
                fences = self.copier.load(chunks, after)
            except BaseException:
                self.pool.release(slots)
                raise
            if fences[-1].done():  # plain copies (the CPU build): complete when issued
                self.pool.release(slots)
            else:
                self._watcher.watch(fences[-1], lambda done=slots: self.pool.release(done))
        return fences

    def _stage(self, slot: Slot, block_ids: Sequence[int], records: Sequence[bytes | bytearray | memoryview]) -> None:
        n = len(block_ids)
        slot.ids.numpy()[:n] = block_ids
        data = slot.data.numpy()
        for i, record in enumerate(records):
            self.layout.stage(data, n, i, np.frombuffer(record, dtype=np.uint8))
