"""Score-decay eviction (policy ``attention-decay``): attention scores weighted, with recency and attention-sink
protection, tails before prefixes.

Superseded as the ``attention`` policy by attention_arc.py, which keeps ARC and uses scores only where they
are measured to predict reuse (this one ranks by scores alone and loses to LRU/ARC where they do not: see
docs/attention-results.md). Kept as an option; its decay uses the wall clock (``clock``), so its victims depend
on timing.

Every tracked block carries a score that decays exponentially with a half-life. It starts at
``default_score`` when the block is inserted; ``update_scores`` adds reported attention mass, and an access
(a cache hit or a re-insert) adds ``default_score`` again, so without any reports the policy ranks blocks
by exponentially decayed hit counts. Victims are the blocks with the lowest decayed score per byte.

Protected, never returned by ``evict``: keys protected through the base API, the ``protect_recent`` most
recently inserted or accessed keys, and (with ``protect_sinks``) keys marked by ``mark_sink`` as the first
block of a sequence. Prefix chains recorded by ``set_parent`` are evicted tail first: a block is a candidate
only once none of its children is still held, so a prefix never loses a middle block while its tail stays.
Links and sink marks apply to tracked keys (call them after ``on_insert``) and end when the key leaves;
link cycles are not checked (keys are chained hashes): blocks on a cycle would never become candidates.

Ranking is time-independent: ``ln(score) + t*ln2/half_life - ln(size)`` (``t`` = time of the last score
change) orders blocks exactly as their decayed score per byte does at any later moment, and never
underflows. Candidates therefore live in one heap with lazy deletion: O(log n) per update, and ``evict``
costs O(log n) per victim plus the ``protect_recent`` window; keys protected through the base API are
parked outside the heap when met, until ``unprotect`` releases them.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from typing import Any

from kvtier.keys import BlockKey
from kvtier.policies.base import EvictionPolicy, Score, score_value

# (rank, tick of the last insert/access, key): lower is evicted first; among equal ranks the least recent.
_Entry = tuple[float, int, BlockKey]


class AttentionPolicy(EvictionPolicy):
    """Lowest decayed attention score per byte first; see the module docstring for the rules."""

    name = "attention-decay"

    def __init__(self, *, half_life_s: float = 300.0, protect_recent: int = 4, protect_sinks: bool = True,
                 default_score: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 **params: Any) -> None:
        super().__init__(**params)
        if isinstance(half_life_s, bool) or not isinstance(half_life_s, int | float) \
                or not math.isfinite(half_life_s) or half_life_s <= 0:
            raise ValueError(f"half_life_s: expected a positive number of seconds, got {half_life_s!r}")
        if isinstance(protect_recent, bool) or not isinstance(protect_recent, int) or protect_recent < 0:
            raise ValueError(f"protect_recent: expected an integer >= 0, got {protect_recent!r}")
        if not isinstance(protect_sinks, bool):
            raise ValueError(f"protect_sinks: expected true or false, got {protect_sinks!r}")  # noqa: TRY004
        if isinstance(default_score, bool) or not isinstance(default_score, int | float) \
                or not math.isfinite(default_score) or default_score < 0:
            raise ValueError(f"default_score: expected a finite number >= 0, got {default_score!r}")
        if not callable(clock):
            raise ValueError(f"clock: expected a callable returning seconds, got {clock!r}")  # noqa: TRY004
        self._rate = math.log(2.0) / float(half_life_s)  # decay per second, in natural-log units
        self._protect_recent = protect_recent
        self._protect_sinks = protect_sinks
        self._default = float(default_score)
        self._clock = clock
        self._sizes: dict[BlockKey, int] = {}
        self._scores: dict[BlockKey, tuple[float, float]] = {}  # key -> (score at time t, t)
        self._recent: OrderedDict[BlockKey, int] = OrderedDict()  # key -> tick, least recent first
        self._sinks: set[BlockKey] = set()
        self._parent: dict[BlockKey, BlockKey] = {}  # tracked child -> parent (tracked or not)
        self._children: dict[BlockKey, set[BlockKey]] = {}  # parent -> its tracked children
        self._entries: dict[BlockKey, _Entry] = {}  # the current heap entry of each candidate
        self._heap: list[_Entry] = []
        self._parked: set[BlockKey] = set()  # protected candidates taken off the heap by evict
        self._tick = 0

    # ---- tracking ----------------------------------------------------------------------------------
    def on_insert(self, key: BlockKey, size: int) -> None:
        if key in self._sizes:
            self._sizes[key] = size
            self.on_access(key)
            return
        self._sizes[key] = size
        self._scores[key] = (self._default, self._clock())
        self._touch(key)

    def on_access(self, key: BlockKey) -> None:
        if key in self._sizes:
            self._add_score(key, self._default, self._clock())
            self._touch(key)

    def on_remove(self, key: BlockKey) -> None:
        if key in self._sizes:
            self._forget(key)

    def update_scores(self, scores: Mapping[BlockKey, Score]) -> None:
        """Add reported attention mass (a per-layer score counts its mean; negative or NaN values count as 0);
        untracked keys are ignored."""
        now = self._clock()
        for key, score in scores.items():
            if key in self._sizes:
                value = score_value(score)
                self._add_score(key, value if value > 0 and math.isfinite(value) else 0.0, now)
                self._refresh(key)

    def mark_sink(self, keys: Iterable[BlockKey]) -> None:
        """Mark tracked keys as the first block of a sequence (protected while ``protect_sinks``)."""
        for key in keys:
            if key in self._sizes:
                self._sinks.add(key)
                self._refresh(key)

    def set_parent(self, key: BlockKey, parent: BlockKey) -> None:
        """Record that tracked ``key`` extends ``parent``'s prefix; ``parent`` then waits for ``key``."""
        if key == parent:
            raise ValueError("set_parent: a block cannot be its own parent")
        if key not in self._sizes:
            return
        old = self._parent.get(key)
        if old == parent:
            return
        if old is not None:
            self._unlink(key)
        self._parent[key] = parent
        self._children.setdefault(parent, set()).add(key)
        self._refresh(parent)

    link = set_parent

    def unprotect(self, keys: Iterable[BlockKey]) -> None:
        keys = list(keys)
        super().unprotect(keys)
        for key in keys:
            if key in self._parked and not self.is_protected(key):
                self._parked.discard(key)
                if key in self._entries:
                    heapq.heappush(self._heap, self._entries[key])

    def score(self, key: BlockKey) -> float:
        """The decayed score of ``key`` now (0.0 when untracked)."""
        if key not in self._scores:
            return 0.0
        value, t = self._scores[key]
        return value * math.exp(-self._rate * max(self._clock() - t, 0.0))

    # ---- eviction ----------------------------------------------------------------------------------
    def evict(self, nbytes: int) -> list[BlockKey]:
        if nbytes <= 0:
            return []
        recent = set(islice(reversed(self._recent), self._protect_recent))
        exposed: list[_Entry] = []  # parents whose last held child is a victim of this call
        left: dict[BlockKey, int] = {}  # parent -> children not yet chosen in this call
        popped: list[_Entry] = []
        victims: list[BlockKey] = []
        freed = 0
        while freed < nbytes:
            entry, from_heap = self._next_candidate(exposed)
            if entry is None:
                break
            key = entry[2]
            if from_heap and self.is_protected(key):
                self._parked.add(key)  # back on the heap when unprotected: nothing observable changes
                continue
            if from_heap:
                popped.append(entry)
            if key in recent or self.is_protected(key):
                continue
            victims.append(key)
            freed += self._sizes[key]
            parent = self._parent.get(key)
            if parent is not None and parent in self._sizes:
                left[parent] = left.get(parent, len(self._children[parent])) - 1
                if left[parent] == 0 and not self._sink_protected(parent):
                    heapq.heappush(exposed, self._make_entry(parent))
        chosen = set(victims) if freed >= nbytes else set()
        for entry in popped:
            if entry[2] not in chosen:
                heapq.heappush(self._heap, entry)
        if not chosen:
            return []  # not enough evictable bytes: nothing was changed
        for key in victims:
            self._forget(key)
        return victims

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    # ---- helpers -----------------------------------------------------------------------------------
    def _next_candidate(self, exposed: list[_Entry]) -> tuple[_Entry | None, bool]:
        """Pop the lowest current entry of the heap or of this call's ``exposed`` parents (and which it was)."""
        while self._heap and self._entries.get(self._heap[0][2]) is not self._heap[0]:
            heapq.heappop(self._heap)  # stale entry
        if exposed and (not self._heap or exposed[0] < self._heap[0]):
            return heapq.heappop(exposed), False
        if not self._heap:
            return None, False
        return heapq.heappop(self._heap), True

    def _add_score(self, key: BlockKey, amount: float, now: float) -> None:
        value, t = self._scores[key]
        decayed = value * math.exp(-self._rate * max(now - t, 0.0))
        self._scores[key] = (decayed + amount, max(now, t))

    def _touch(self, key: BlockKey) -> None:
        self._tick += 1
        self._recent[key] = self._tick
        self._recent.move_to_end(key)
        self._refresh(key)

    def _sink_protected(self, key: BlockKey) -> bool:
        return self._protect_sinks and key in self._sinks

    def _make_entry(self, key: BlockKey) -> _Entry:
        value, t = self._scores[key]
        log_value = math.log(value) if value > 0 else -math.inf
        rank = log_value + self._rate * t - math.log(max(self._sizes[key], 1))
        return (rank, self._recent[key], key)

    def _refresh(self, key: BlockKey) -> None:
        """Re-rank ``key``: in the heap while it is a tracked leaf and not a protected sink."""
        if key in self._sizes and not self._children.get(key) and not self._sink_protected(key):
            entry = self._make_entry(key)
            self._entries[key] = entry
            heapq.heappush(self._heap, entry)
            self._parked.discard(key)
            if len(self._heap) > 2 * len(self._entries) + 64:
                self._parked.clear()
                self._heap = list(self._entries.values())
                heapq.heapify(self._heap)
        else:
            self._entries.pop(key, None)
            self._parked.discard(key)

    def _unlink(self, key: BlockKey) -> None:
        parent = self._parent.pop(key, None)
        if parent is None:
            return
        siblings = self._children[parent]
        siblings.discard(key)
        if not siblings:
            del self._children[parent]
            self._refresh(parent)

    def _forget(self, key: BlockKey) -> None:
        del self._sizes[key]
        del self._scores[key]
        del self._recent[key]
        self._sinks.discard(key)
        self._entries.pop(key, None)
        self._parked.discard(key)
        self._unlink(key)
