"""Placement: where the scheduler believes each stored block lives, fed only by typed events from workers.

Workers own the tiers; the scheduler never opens one. It learns placement from two messages:
- at start-up, ``StartupPlacement`` (vLLM's worker -> scheduler handshake channel): the blocks each worker's
  persistent tiers already held (a previous run, other instances' shared blocks), packed per tier;
- every step, ``PlacementEvent``s in the worker metadata: a block stored or moved (tier name) or gone (None).
The index is a belief, not the truth: a block it lists may have vanished since (another instance deleted it,
a server lost it); the load then misses and vLLM recomputes.

Under tensor/pipeline parallelism every rank stores its own shard under its own key (``keys.rank_key``); the
events carry those shard keys, and a block counts as held only when every rank's shard is (``holder``), so no
load is ever planned that some rank cannot serve.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from kvtier.keys import KEY_SIZE, BlockKey, rank_key


class PlacementEvent(NamedTuple):
    key: BlockKey
    tier: str | None  # the tier that now holds the block, or None when no tier does


@dataclass
class StartupPlacement:
    """The blocks a worker's tiers held when it started: tier name -> concatenated 16-byte keys."""

    tiers: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def pack(cls, held: Iterable[tuple[str, Iterable[BlockKey]]]) -> StartupPlacement:
        return cls({name: b"".join(keys) for name, keys in held})

    def events(self) -> Iterator[PlacementEvent]:
        for name, packed in self.tiers.items():
            for start in range(0, len(packed) - len(packed) % KEY_SIZE, KEY_SIZE):
                yield PlacementEvent(packed[start:start + KEY_SIZE], name)


class PlacementIndex:
    def __init__(self, world: int = 1) -> None:
        self.world = world  # ranks that each hold a shard of every block
        self._where: dict[BlockKey, str] = {}

    def shard_keys(self, key: BlockKey) -> list[BlockKey]:
        """The keys under which each rank stores its shard of block ``key``."""
        return [rank_key(key, rank, self.world) for rank in range(self.world)]

    def holder(self, key: BlockKey) -> str | None:
        """The tier rank 0's shard of ``key`` lives in, when every rank holds its shard; else None."""
        if self.world == 1:
            return self._where.get(key)
        shards = self.shard_keys(key)
        if any(shard not in self._where for shard in shards):
            return None
        return self._where[shards[0]]

    def apply(self, events: Iterable[tuple[BlockKey, str | None]]) -> None:
        for key, tier in events:
            if tier is None:
                self._where.pop(key, None)
            else:
                self._where[key] = tier

    def learn(self, events: Iterable[tuple[BlockKey, str | None]]) -> None:
        """Start-up knowledge: never overrides what a step already reported (the faster tier, listed first,
        wins among start-up reports)."""
        for key, tier in events:
            if tier is not None:
                self._where.setdefault(key, tier)

    def tier_of(self, key: BlockKey) -> str | None:
        return self._where.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def clear(self) -> None:
        self._where.clear()
