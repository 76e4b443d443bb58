"""Controls for benchmarks: attention-aware policies fed uninformative scores with the same distribution.

On workloads where LRU is pathological (reuse distance just above capacity), *any* deviation from recency
order can raise the hit rate, the way random replacement beats LRU on a loop. A shuffled-score control
replaces every reported score by a random draw from the scores reported so far, so it keeps the size and
spread of the real signal but not which block received it: the gap between a policy and its shuffled control
is what the attention signal itself is worth.

- ``ShuffledScores`` wraps any registered policy: ``policy: {name: "kvtier_bench.controls:ShuffledScores",
  policy: attention, ...that policy's params}``.
- ``ShuffledScoresPolicy`` is the ``attention-decay`` policy with shuffled scores (kept for its tests and the
  earlier benchmark rows).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from kvtier.config import PolicyConfig
from kvtier.keys import BlockKey
from kvtier.policies import EvictionPolicy, make_policy
from kvtier.policies.attention import AttentionPolicy


class _Shuffler:
    def __init__(self, seed: int, pool_size: int) -> None:
        self._rng = random.Random(seed)
        self._pool: deque[float] = deque(maxlen=pool_size)

    def __call__(self, scores: Mapping[BlockKey, Any]) -> dict[BlockKey, Any]:
        """One random draw from the pool per distinct score in the call: blocks that were reported together
        with one score (one request's blocks) still share one, only not their own."""
        values = list(scores.values())
        self._pool.extend(values)
        if not self._pool:
            return {}
        draws: dict[Any, Any] = {}
        for value in values:
            token = _hashable(value)
            if token not in draws:
                draws[token] = self._rng.choice(self._pool)
        return {key: draws[_hashable(value)] for key, value in scores.items()}


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


class ShuffledScores(EvictionPolicy):
    """Any policy (``policy``, default attention, with its own params) fed shuffled scores."""

    name = "shuffled"

    def __init__(self, *, policy: str = "attention", shuffle_seed: int = 0, pool_size: int = 4096,
                 **params: Any) -> None:
        super().__init__()
        self.inner = make_policy(PolicyConfig(name=policy, params=params))
        self._shuffle = _Shuffler(shuffle_seed, pool_size)

    def update_scores(self, scores: Mapping[BlockKey, Any]) -> None:
        shuffled = self._shuffle(scores)
        if shuffled:
            self.inner.update_scores(shuffled)

    def on_insert(self, key: BlockKey, size: int) -> None:
        self.inner.on_insert(key, size)

    def on_access(self, key: BlockKey) -> None:
        self.inner.on_access(key)

    def on_remove(self, key: BlockKey) -> None:
        self.inner.on_remove(key)

    def evict(self, nbytes: int) -> list[BlockKey]:
        return self.inner.evict(nbytes)

    def protect(self, keys: Iterable[BlockKey]) -> None:
        self.inner.protect(keys)

    def unprotect(self, keys: Iterable[BlockKey]) -> None:
        self.inner.unprotect(keys)

    def is_protected(self, key: BlockKey) -> bool:
        return self.inner.is_protected(key)

    def mark_sink(self, keys: Iterable[BlockKey]) -> None:
        self.inner.mark_sink(keys)

    def set_parent(self, key: BlockKey, parent: BlockKey) -> None:
        self.inner.set_parent(key, parent)

    def __contains__(self, key: object) -> bool:
        return key in self.inner

    def __len__(self) -> int:
        return len(self.inner)


class ShuffledScoresPolicy(AttentionPolicy):
    name = "attention-decay-shuffled"

    def __init__(self, *, shuffle_seed: int = 0, pool_size: int = 4096, **params: Any) -> None:
        super().__init__(**params)
        self._shuffle = _Shuffler(shuffle_seed, pool_size)

    def update_scores(self, scores: Mapping[BlockKey, Any]) -> None:
        shuffled = self._shuffle(scores)
        if shuffled:
            super().update_scores(shuffled)
