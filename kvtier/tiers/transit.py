"""InTransit: blocks between their eviction from one tier and their landing in the next, so a read meanwhile
still finds them (the record in hand, in its source tier's format), and a count of landings that tells a read
whether it should scan the tiers again."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from kvtier.keys import BlockKey
from kvtier.tiers.base import Victim


class InTransit:
    def __init__(self) -> None:
        self._moving: dict[BlockKey, tuple[int, bytes]] = {}  # key -> (source tier index, record)
        self._lock = threading.Lock()
        self.landed = 0  # demotions finished; a read rescans when this moved during its scan

    def __len__(self) -> int:
        return len(self._moving)

    def begin(self, index: int, victims: Sequence[Victim]) -> None:
        """Tier ``index`` evicted ``victims``; those with a record in hand are on their way down."""
        with self._lock:
            for key, record in victims:
                if record is not None:
                    self._moving[key] = (index, record)

    def end(self, key: BlockKey, index: int) -> None:
        """``key``'s move out of tier ``index`` is over (landed below, or dropped)."""
        with self._lock:
            if key in self._moving and self._moving[key][0] == index:
                del self._moving[key]
                self.landed += 1

    def get(self, key: BlockKey) -> tuple[int, bytes] | None:
        """(source tier index, record) of a victim on its way down, or None."""
        with self._lock:
            return self._moving.get(key)
