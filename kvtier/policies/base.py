"""EvictionPolicy ABC: which keys leave a tier when it needs room. Policy is kept apart from storage."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kvtier.keys import BlockKey

# An attention score: one number, or one number per attention layer (what kvtier.attention reports).
Score = float | Sequence[float]


def score_value(score: Score) -> float:
    """One number for a score: the mean of a per-layer score's finite entries (0.0 when there are none)."""
    if isinstance(score, int | float):
        return float(score)
    finite = [float(v) for v in score if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else 0.0


class EvictionPolicy(ABC):
    """Tracks the keys a tier holds and chooses victims.

    Contract (every implementation passes tests/test_policy_contract.py):
    - ``on_insert(key, size)`` starts tracking ``key`` (re-inserting a tracked key updates its size and counts
      as an access). ``on_access`` of an untracked key is ignored. ``on_remove`` of an untracked key is ignored.
    - ``evict(nbytes)`` is atomic: it either returns victims whose sizes sum to at least ``nbytes`` and stops
      tracking exactly those, or, when that is impossible (not enough evictable bytes), returns ``[]`` and
      changes nothing. ``evict(0)`` returns ``[]``. Protected keys are never returned.
    - ``protect``/``unprotect`` mark keys that must not be evicted (e.g. blocks being loaded right now).
    - ``update_scores``, ``mark_sink`` and ``set_parent`` feed attention-aware policies (scores, first blocks of
      sequences, prefix links); the defaults ignore them. A score is a float or a sequence of per-layer floats
      (NaN: that layer did not score the block); ``score_value`` turns either into one number.
    - Not thread-safe by itself: the owning tier serialises calls under its lock.
    """

    name: str = "base"

    def __init__(self, **params: Any) -> None:
        if params:
            raise TypeError(f"unknown parameter(s) {sorted(params)} for policy {self.name!r}")
        self._protected: dict[BlockKey, int] = {}

    @abstractmethod
    def on_insert(self, key: BlockKey, size: int) -> None: ...

    @abstractmethod
    def on_access(self, key: BlockKey) -> None: ...

    @abstractmethod
    def on_remove(self, key: BlockKey) -> None: ...

    @abstractmethod
    def evict(self, nbytes: int) -> list[BlockKey]: ...

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...

    def protect(self, keys: Iterable[BlockKey]) -> None:
        for key in keys:
            self._protected[key] = self._protected.get(key, 0) + 1

    def unprotect(self, keys: Iterable[BlockKey]) -> None:
        for key in keys:
            count = self._protected.get(key, 0) - 1
            if count > 0:
                self._protected[key] = count
            else:
                self._protected.pop(key, None)

    def is_protected(self, key: BlockKey) -> bool:
        return key in self._protected

    def update_scores(self, scores: Mapping[BlockKey, Score]) -> None:
        """Per-block importance; ignored by policies that do not use it."""

    def mark_sink(self, keys: Iterable[BlockKey]) -> None:
        """First blocks of sequences (attention sinks); ignored by policies that do not protect them."""

    def set_parent(self, key: BlockKey, parent: BlockKey) -> None:
        """``key`` extends ``parent`` (prefix link); ignored by policies that do not evict tails first."""
