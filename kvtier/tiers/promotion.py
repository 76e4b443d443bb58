"""PromotionGate: is copying lower-tier hits up into the top tier paying off? Measured, not assumed.

A promotion costs an encode and a put into the top tier (and pushes a block out of it); it pays off only when
the promoted block is hit in the top tier before the top tier evicts it. When the blocks reused come back
less often than the top tier turns over (a working set cycling through a small DRAM tier in front of a large
disk), every promotion is evicted unused: the hit path pays for it and gains nothing.

The gate follows the outcome of each promotion: hit in the top tier before its eviction (1) or evicted unused
(0), as an exponential moving average (weight ``1/window`` per outcome, starting at 1). While that average is
at least ``threshold``, every candidate is promoted; below it only every ``sample``-th is, so the outcomes keep
coming and the gate opens again when the workload changes. Time is the caller's event order, never the wall
clock: the same calls give the same decisions. Thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from kvtier.keys import BlockKey


class PromotionGate:
    def __init__(self, threshold: float = 0.25, sample: int = 16, window: int = 32, remember: int = 1 << 16) -> None:
        if not 0.0 <= threshold <= 1.0 or sample < 1 or window < 1 or remember < 1:
            raise ValueError("threshold must be in [0, 1]; sample, window and remember at least 1")
        self.threshold = threshold
        self.sample = sample
        self._alpha = 1.0 / window
        self._remember = remember
        self._worth = 1.0  # moving average of outcomes: the share of promotions hit before their eviction
        self._candidates = 0
        self._pending: OrderedDict[BlockKey, None] = OrderedDict()  # promoted, neither hit nor evicted yet
        self._lock = threading.Lock()
        self.skipped = self.useful = self.wasted = 0

    @property
    def is_open(self) -> bool:
        return self._worth >= self.threshold

    def admit(self) -> bool:
        """A lower tier served a block the top tier lacks: promote it?"""
        with self._lock:
            self._candidates += 1
            if self.is_open or self._candidates % self.sample == 0:
                return True
            self.skipped += 1
            return False

    def landed(self, key: BlockKey) -> None:
        """``key`` was promoted into the top tier: its outcome is pending."""
        with self._lock:
            self._pending[key] = None
            self._pending.move_to_end(key)
            while len(self._pending) > self._remember:  # forgotten without an outcome (a very large top tier)
                self._pending.popitem(last=False)

    def hit(self, key: BlockKey) -> None:
        """The top tier served ``key``."""
        self._outcome(key, 1.0)

    def evicted(self, key: BlockKey) -> None:
        """The top tier evicted (or dropped) ``key``."""
        self._outcome(key, 0.0)

    def _outcome(self, key: BlockKey, value: float) -> None:
        with self._lock:
            if key not in self._pending:
                return  # not a promotion, or its outcome is in
            del self._pending[key]
            self._worth += self._alpha * (value - self._worth)
            if value:
                self.useful += 1
            else:
                self.wasted += 1
