"""A control for benchmarks: the attention policy fed uninformative scores with the same distribution.

On workloads where LRU is pathological (reuse distance just above capacity), *any* deviation from recency
order can raise the hit rate, the way random replacement beats LRU on a loop. ``ShuffledScoresPolicy``
replaces every reported score by a random draw from the scores reported so far, so it keeps the size and
spread of the real signal but not which block received it: the gap between it and ``attention`` is what the
attention signal itself is worth. Use it as ``policy: {name: "kvtier_bench.controls:ShuffledScoresPolicy"}``.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Mapping
from typing import Any

from kvtier.keys import BlockKey
from kvtier.policies.attention import AttentionPolicy


class ShuffledScoresPolicy(AttentionPolicy):
    name = "attention-shuffled"

    def __init__(self, *, shuffle_seed: int = 0, pool_size: int = 4096, **params: Any) -> None:
        super().__init__(**params)
        self._rng = random.Random(shuffle_seed)
        self._pool: deque[float] = deque(maxlen=pool_size)

    def update_scores(self, scores: Mapping[BlockKey, float]) -> None:
        self._pool.extend(scores.values())
        if self._pool:
            super().update_scores({key: self._rng.choice(self._pool) for key in scores})
