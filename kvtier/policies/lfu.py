"""LFU: least frequently used first, ties broken by least recently used."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any

from kvtier.keys import BlockKey
from kvtier.policies.base import EvictionPolicy

# A heap entry: (frequency, tick of the last touch, key). The entry is current only while it is the very
# object stored in ``_entries[key]``; older entries of the same key are skipped and dropped (lazy deletion).
_Entry = tuple[int, int, BlockKey]


class LFUPolicy(EvictionPolicy):
    """Evicts the key with the fewest inserts/accesses; among equals, the one touched longest ago.

    Each insert, re-insert or access costs O(log n), and so does ``evict`` per victim: a protected key met
    on the way is parked outside the heap until ``unprotect`` releases it. ``decay_every`` (0 = off) halves
    every count after that many touches, so keys that were hot long ago do not stay forever (an O(n)
    rebuild, amortised over the touches).
    """

    name = "lfu"

    def __init__(self, *, decay_every: int = 0, **params: Any) -> None:
        super().__init__(**params)
        if isinstance(decay_every, bool) or not isinstance(decay_every, int) or decay_every < 0:
            raise ValueError(f"decay_every: expected an integer >= 0 (0 turns decay off), got {decay_every!r}")
        self._decay_every = decay_every
        self._sizes: dict[BlockKey, int] = {}
        self._entries: dict[BlockKey, _Entry] = {}
        self._heap: list[_Entry] = []
        self._parked: set[BlockKey] = set()  # protected keys whose current entry was taken off the heap
        self._tick = 0
        self._touches = 0

    # ---- tracking ----------------------------------------------------------------------------------
    def on_insert(self, key: BlockKey, size: int) -> None:
        old = self._entries.get(key)
        self._sizes[key] = size
        self._touch(key, 1 if old is None else old[0] + 1)

    def on_access(self, key: BlockKey) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            self._touch(key, entry[0] + 1)

    def on_remove(self, key: BlockKey) -> None:
        if self._sizes.pop(key, None) is not None:
            del self._entries[key]
            self._parked.discard(key)

    def unprotect(self, keys: Iterable[BlockKey]) -> None:
        keys = list(keys)
        super().unprotect(keys)
        for key in keys:
            if key in self._parked and not self.is_protected(key):
                self._parked.discard(key)
                heapq.heappush(self._heap, self._entries[key])

    def frequency(self, key: BlockKey) -> int:
        """The current count of ``key`` (0 when untracked)."""
        entry = self._entries.get(key)
        return 0 if entry is None else entry[0]

    # ---- eviction ----------------------------------------------------------------------------------
    def evict(self, nbytes: int) -> list[BlockKey]:
        if nbytes <= 0:
            return []
        victims: list[BlockKey] = []
        freed = 0
        while self._heap and freed < nbytes:
            entry = heapq.heappop(self._heap)
            key = entry[2]
            if self._entries.get(key) is not entry:
                continue  # stale: dropping it changes nothing observable
            if self.is_protected(key):
                self._parked.add(key)  # back on the heap when unprotected: same order, nothing changes
                continue
            victims.append(key)
            freed += self._sizes[key]
        if freed < nbytes:
            for key in victims:
                heapq.heappush(self._heap, self._entries[key])
            return []
        for key in victims:
            del self._sizes[key]
            del self._entries[key]
        return victims

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    # ---- helpers -----------------------------------------------------------------------------------
    def _touch(self, key: BlockKey, freq: int) -> None:
        self._tick += 1
        entry = (freq, self._tick, key)
        self._entries[key] = entry
        heapq.heappush(self._heap, entry)
        self._parked.discard(key)
        self._touches += 1
        if self._decay_every and self._touches % self._decay_every == 0:
            self._decay()
        elif len(self._heap) > 2 * len(self._entries) + 64:
            self._rebuild()

    def _decay(self) -> None:
        self._entries = {k: (max(1, f // 2), t, k) for k, (f, t, _) in self._entries.items()}
        self._rebuild()

    def _rebuild(self) -> None:
        self._parked.clear()  # protected entries go back in too; evict parks them again when met
        self._heap = list(self._entries.values())
        heapq.heapify(self._heap)
