"""ARC (Adaptive Replacement Cache, Megiddo & Modha) adapted to blocks of different byte sizes.

Resident keys live in T1 (seen once since they entered) or T2 (seen at least twice); keys evicted from them
are remembered, without their data, in the ghost lists B1 and B2. The target ``p`` is the number of bytes
T1 should hold: a re-insert of a B1 ghost says T1 was too small (grow ``p``), one of a B2 ghost says T2 was
too small (shrink ``p``). ``evict`` takes from T1 while T1 holds more than ``p`` bytes, else from T2, each
in least-recently-used order. The tier, not the policy, knows the capacity, so ``p`` is bounded by the bytes
currently resident, and each ghost list by ``max_ghosts`` keys (default: the number of resident keys).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from kvtier.keys import BlockKey
from kvtier.policies.base import EvictionPolicy

_MIN_GHOSTS = 64


class ARCPolicy(EvictionPolicy):
    """Scan-resistant: a one-time pass over many keys cycles through T1 and leaves T2 (the hot keys) alone."""

    name = "arc"

    def __init__(self, *, max_ghosts: int | None = None, **params: Any) -> None:
        super().__init__(**params)
        if max_ghosts is not None and (isinstance(max_ghosts, bool) or not isinstance(max_ghosts, int)
                                       or max_ghosts < 0):
            raise ValueError(f"max_ghosts: expected an integer >= 0 or null (auto), got {max_ghosts!r}")
        self._max_ghosts = max_ghosts
        self._t1: OrderedDict[BlockKey, int] = OrderedDict()  # key -> size, least recent first
        self._t2: OrderedDict[BlockKey, int] = OrderedDict()
        self._b1: OrderedDict[BlockKey, None] = OrderedDict()
        self._b2: OrderedDict[BlockKey, None] = OrderedDict()
        self._t1_bytes = 0
        self._t2_bytes = 0
        self._p = 0.0

    @property
    def target_t1_bytes(self) -> float:
        """The adaptive target ``p``: how many bytes the recency list T1 aims to hold."""
        return self._p

    def list_of(self, key: BlockKey) -> str | None:
        """Which list holds ``key``: 't1', 't2', 'b1', 'b2', or None (for tests and `kvtier inspect`)."""
        for name, lst in (("t1", self._t1), ("t2", self._t2), ("b1", self._b1), ("b2", self._b2)):
            if key in lst:
                return name
        return None

    # ---- tracking ----------------------------------------------------------------------------------
    def on_insert(self, key: BlockKey, size: int) -> None:
        if key in self._t1 or key in self._t2:
            self._pop_resident(key)
            self._push_t2(key, size)  # a re-insert counts as an access
        elif key in self._b1:
            del self._b1[key]
            self._adapt(grow=True, size=size)
            self._push_t2(key, size)
        elif key in self._b2:
            del self._b2[key]
            self._adapt(grow=False, size=size)
            self._push_t2(key, size)
        else:
            self._t1[key] = size
            self._t1_bytes += size
        self._trim_ghosts()

    def on_access(self, key: BlockKey) -> None:
        if key in self._t1 or key in self._t2:
            self._push_t2(key, self._pop_resident(key))

    def on_remove(self, key: BlockKey) -> None:
        if key in self._t1 or key in self._t2:
            self._pop_resident(key)  # an explicit removal is not an eviction: no ghost is kept

    # ---- eviction ----------------------------------------------------------------------------------
    def evict(self, nbytes: int) -> list[BlockKey]:
        if nbytes <= 0:
            return []
        from_t1: list[BlockKey] = []
        from_t2: list[BlockKey] = []
        freed = 0
        t1_left = self._t1_bytes
        p = min(self._p, self._t1_bytes + self._t2_bytes)
        it1, it2 = self._evictable(self._t1), self._evictable(self._t2)
        next1, next2 = next(it1, None), next(it2, None)
        while freed < nbytes:
            if next1 is not None and (t1_left > p or next2 is None):
                key, size = next1
                from_t1.append(key)
                t1_left -= size
                next1 = next(it1, None)
            elif next2 is not None:
                key, size = next2
                from_t2.append(key)
                next2 = next(it2, None)
            else:
                return []  # not enough evictable bytes: nothing was changed
            freed += size
        for key in from_t1:
            self._t1_bytes -= self._t1.pop(key)
            self._b1[key] = None
        for key in from_t2:
            self._t2_bytes -= self._t2.pop(key)
            self._b2[key] = None
        self._trim_ghosts()
        return from_t1 + from_t2

    def __contains__(self, key: object) -> bool:
        return key in self._t1 or key in self._t2

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    # ---- helpers -----------------------------------------------------------------------------------
    def _evictable(self, lst: OrderedDict[BlockKey, int]) -> Iterator[tuple[BlockKey, int]]:
        return ((k, s) for k, s in lst.items() if not self.is_protected(k))

    def _pop_resident(self, key: BlockKey) -> int:
        if key in self._t1:
            size = self._t1.pop(key)
            self._t1_bytes -= size
        else:
            size = self._t2.pop(key)
            self._t2_bytes -= size
        return size

    def _push_t2(self, key: BlockKey, size: int) -> None:
        self._t2[key] = size
        self._t2_bytes += size

    def _adapt(self, grow: bool, size: int) -> None:
        """A ghost hit moves ``p`` by one block, scaled up when the other ghost list is the longer one."""
        b1, b2 = len(self._b1) + (1 if grow else 0), len(self._b2) + (0 if grow else 1)
        ratio = max(1.0, b2 / b1) if grow else max(1.0, b1 / b2)
        delta = ratio * max(size, 1)
        limit = float(self._t1_bytes + self._t2_bytes + size)
        self._p = min(self._p + delta, limit) if grow else max(self._p - delta, 0.0)

    def _trim_ghosts(self) -> None:
        limit = self._max_ghosts
        if limit is None:
            limit = max(len(self._t1) + len(self._t2), _MIN_GHOSTS)
        for ghosts in (self._b1, self._b2):
            while len(ghosts) > limit:
                ghosts.popitem(last=False)
