from __future__ import annotations

from collections import OrderedDict
from typing import Any

from kvtier.keys import BlockKey
from kvtier.policies.base import EvictionPolicy


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    name = "lru"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._order: OrderedDict[BlockKey, int] = OrderedDict()

    def on_insert(self, key: BlockKey, size: int) -> None:
        self._order[key] = size
        self._order.move_to_end(key)

    def on_access(self, key: BlockKey) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key: BlockKey) -> None:
        self._order.pop(key, None)

    def evict(self, nbytes: int) -> list[BlockKey]:
        if nbytes <= 0:
            return []
        victims: list[BlockKey] = []
        freed = 0
        for key, size in self._order.items():
            if self.is_protected(key):
                continue
            victims.append(key)
            freed += size
            if freed >= nbytes:
                break
        if freed < nbytes:
            return []
        for key in victims:
            del self._order[key]
        return victims

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)
