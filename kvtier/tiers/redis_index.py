"""RedisPrefixIndex: a shared "who holds what" index kept in Redis, so one instance learns what another stored.

The index is written by kvtier itself but lives on a server other processes can write to, so every entry is
checked before it is believed: a size must be a positive integer, a field a 16-byte key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import redis
from redis.exceptions import RedisError

from kvtier.errors import TierError
from kvtier.keys import KEY_SIZE, BlockKey

T = TypeVar("T")
MAX_ENTRY_SIZE = 1 << 40


def _positive_int(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if 0 < number <= MAX_ENTRY_SIZE else None


class RedisPrefixIndex:
    """Which block keys exist in which shared tier, kept in Redis so one instance learns what another stored.

    Layout: the set ``{key_prefix}:index`` holds tier names; the hash ``{key_prefix}:index:{tier}`` maps each
    16-byte block key to its record size. The index is a hint, not the truth: a block that expired or was
    evicted by the server may still be listed until a reader finds it gone and removes it.
    Methods raise TierError when Redis fails; ``pipe`` lets a caller batch index updates with its own writes.
    """

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self.client = client
        self.root = f"{key_prefix}:index"
        self.malformed = 0

    def hash_name(self, tier_name: str) -> str:
        return f"{self.root}:{tier_name}"

    def add(self, keys: Iterable[BlockKey], tier_name: str, sizes: Sequence[int] | None = None,
            pipe: Any = None) -> None:
        keys = list(keys)
        if not keys:
            return
        mapping: dict[Any, Any] = {k: (sizes[i] if sizes else 0) for i, k in enumerate(keys)}
        target = pipe if pipe is not None else self.client.pipeline(transaction=False)
        target.sadd(self.root, tier_name)
        target.hset(self.hash_name(tier_name), mapping=mapping)
        if pipe is None:
            self._run(target.execute)

    def remove(self, keys: Iterable[BlockKey], tier_name: str | None = None, pipe: Any = None) -> None:
        keys = list(keys)
        if not keys:
            return
        tiers = [tier_name] if tier_name else self.tiers()
        target = pipe if pipe is not None else self.client.pipeline(transaction=False)
        for name in tiers:
            target.hdel(self.hash_name(name), *keys)
        if pipe is None:
            self._run(target.execute)

    def tiers(self) -> list[str]:
        members: Any = self._run(lambda: self.client.smembers(self.root))
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    def which(self, keys: Sequence[BlockKey]) -> dict[BlockKey, list[str]]:
        """For each key some tier holds, the names of those tiers (keys nobody holds are left out)."""
        found: dict[BlockKey, list[str]] = {}
        tiers = self.tiers()
        if not keys or not tiers:
            return found
        pipe = self.client.pipeline(transaction=False)
        for name in tiers:
            pipe.hmget(self.hash_name(name), list(keys))
        for name, sizes in zip(tiers, self._run(pipe.execute)):
            for key, size in zip(keys, sizes):
                if size is not None:
                    found.setdefault(key, []).append(name)
        return found

    def members(self, tier_name: str) -> Iterator[tuple[BlockKey, int]]:
        """Every (key, size) recorded for ``tier_name``. Entries that make no sense (a field that is not a
        16-byte key, a size that is not a positive integer) are skipped and counted in ``malformed``."""
        items = self._run(lambda: list(self.client.hscan_iter(self.hash_name(tier_name), count=1000)))
        for key, size in items:
            parsed = _positive_int(size)
            if len(key) != KEY_SIZE or parsed is None:
                self.malformed += 1
                continue
            yield bytes(key), parsed

    @staticmethod
    def _run(fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RedisError as exc:
            raise TierError(f"shared index: {type(exc).__name__}: {exc}") from None
