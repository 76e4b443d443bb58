"""StagingPool: the host memory every copy between vLLM's KV cache and the tiers goes through.

Allocated once at start-up (pinned where CUDA is: device copies from and to it are asynchronous DMA) as one
tensor of ``connector.staging_bytes``, cut into fixed slots of ``connector.staging_chunk_bytes`` (at most a
quarter of the pool, and at least one block). A slot holds one chunk of up to ``chunk_blocks``
blocks (layer-major, see KVLayout) and the block ids of that chunk (an int64 row, so index tensors reach the
device asynchronously from pinned memory too). Nothing is allocated per step.

Saves take slots without ever waiting, and never more than half of them (``save_limit``): a save that finds
none is dropped and counted (a dropped save is only a future miss), and loads always find room. Loads may take
every slot; when none is free they wait (back-pressure: slots come back as soon as the copies using them
complete) for at most ``wait_s``, then fail with StagingTimeout (their blocks are recomputed).
Torch's pinned allocator may round an allocation up to a power of two: keep ``staging_bytes`` one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from kvtier.errors import ConfigError, KVTierError
from kvtier.units import format_size

ID_BYTES = 8  # int64 block ids


class StagingTimeout(KVTierError):
    """No staging slot came free within the pool's ``wait_s``."""


@dataclass(eq=False)
class Slot:
    index: int
    data: torch.Tensor  # uint8 [slot_bytes]: one chunk of blocks
    ids: torch.Tensor  # int64 [chunk_blocks]: the chunk's block ids
    for_save: bool = False


class StagingPool:
    def __init__(self, block_bytes: int, total_bytes: int, chunk_bytes: int, pin: bool, wait_s: float = 10.0) -> None:
        chunk_bytes = min(chunk_bytes, total_bytes // 4)  # a small pool gets smaller chunks, not fewer
        self.chunk_blocks = max(1, chunk_bytes // block_bytes)
        self.slot_bytes = self.chunk_blocks * block_bytes
        per_slot = self.slot_bytes + self.chunk_blocks * ID_BYTES
        count = (total_bytes - ID_BYTES) // per_slot  # ids start 8-byte aligned after the chunks
        if count < 2:
            raise ConfigError(
                f"connector.staging_bytes: {format_size(total_bytes)} holds fewer than 2 staging chunks of "
                f"{self.chunk_blocks} blocks ({format_size(self.slot_bytes)}, one block is {block_bytes} bytes); "
                f"raise it to at least {format_size(2 * per_slot + ID_BYTES)}")
        self.count = count
        self.total_bytes = total_bytes
        self.pinned = pin
        self.wait_s = wait_s
        self.save_limit = max(1, count // 2)
        self._memory = torch.empty(total_bytes, dtype=torch.uint8, pin_memory=pin)
        ids_start = -(-count * self.slot_bytes // ID_BYTES) * ID_BYTES
        ids = self._memory[ids_start:ids_start + count * self.chunk_blocks * ID_BYTES].view(torch.int64)
        ids = ids.view(count, self.chunk_blocks)
        self._slots = [Slot(k, self._memory[k * self.slot_bytes:(k + 1) * self.slot_bytes], ids[k])
                       for k in range(count)]
        self._free = list(self._slots)
        self._cond = threading.Condition()
        self._save_held = 0
        self.waits = 0  # loads that found no free slot and waited
        self.timeouts = 0
        self.peak_in_use = 0

    @property
    def in_use(self) -> int:
        with self._cond:
            return self.count - len(self._free)

    def try_acquire_for_save(self, count: int) -> list[Slot]:
        """Up to ``count`` slots, never waiting, within the saves' share; possibly none."""
        with self._cond:
            take = min(count, len(self._free), self.save_limit - self._save_held)
            slots = self._take(max(0, take))
            for slot in slots:
                slot.for_save = True
            self._save_held += len(slots)
            return slots

    def acquire(self, count: int) -> list[Slot]:
        """At least one slot and up to ``count``; waits only while none is free (at most ``wait_s``)."""
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            if not self._free:
                self.waits += 1
            while not self._free:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.timeouts += 1
                    raise StagingTimeout(f"no staging slot came free within {self.wait_s:.1f} s "
                                         f"({self.count} slots of {format_size(self.slot_bytes)} all busy)")
                self._cond.wait(remaining)
            return self._take(count)

    def release(self, slots: list[Slot]) -> None:
        with self._cond:
            for slot in slots:
                if slot.for_save:
                    self._save_held -= 1
                    slot.for_save = False
                self._free.append(slot)
            self._cond.notify_all()

    def _take(self, count: int) -> list[Slot]:
        """The most recently released slots first: memory in use stays warm, and on the CPU build (where the
        pool is not pinned) untouched slots never become resident."""
        cut = max(0, len(self._free) - count)
        slots, self._free = self._free[cut:], self._free[:cut]
        self.peak_in_use = max(self.peak_in_use, self.count - len(self._free))
        return slots
