"""Tier ABC: a byte-capacity store of encoded block records, with eviction by its policy.

Subclasses implement the raw storage primitives (``_write``, ``_read``, ``_discard``, ``_scan``); this base
class owns capacity accounting, the policy and the lock, so every tier evicts the same way.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator

from kvtier.codecs import BlockCodec
from kvtier.errors import TierError, TierFullError
from kvtier.keys import BlockKey
from kvtier.policies.base import EvictionPolicy

log = logging.getLogger(__name__)

Victim = tuple[BlockKey, bytes | None]  # key and its record (None when the record could not be read back)


class Tier(ABC):
    """Contract (tests/test_tier_contract.py runs it against every tier):

    - ``put(key, record)`` stores the record (replacing an existing one) and returns the victims it evicted to
      make room, each with its record so the stack can demote it. It raises TierFullError when the record
      cannot fit even after evicting all unprotected keys, and TierError when storage fails; in both cases
      nothing already stored is lost except the returned victims.
    - ``get(key)`` returns the exact bytes stored or None (absent, or the backend failed: a miss). It counts
      as an access for the policy.
    - ``contains`` answers from the local index without I/O; ``delete`` returns whether the key was held.
    - ``used_bytes`` never exceeds ``capacity`` (capacity 0 means unbounded, for shared tiers).
    - Thread-safe.
    """

    kind: str = "base"
    # True when ``_read`` is safe without the lock (e.g. files replaced atomically): parallel reads overlap.
    concurrent_reads: bool = False

    def __init__(self, name: str, capacity: int, codec: BlockCodec, policy: EvictionPolicy) -> None:
        self.name = name
        self.capacity = capacity
        self.codec = codec
        self.policy = policy
        self._sizes: dict[BlockKey, int] = {}
        self._used = 0
        self._lock = threading.RLock()

    # ---- storage primitives (called with the lock held) ----------------------------------------------
    @abstractmethod
    def _write(self, key: BlockKey, record: bytes) -> None:
        """Store ``record`` durably enough for this tier; raise TierError on failure."""

    @abstractmethod
    def _read(self, key: BlockKey) -> bytes | None:
        """Return the stored bytes, or None when they are gone; raise TierError on backend failure."""

    @abstractmethod
    def _discard(self, key: BlockKey) -> None:
        """Free the storage of ``key``; must not raise for a key that is already gone."""

    def _footprint(self, size: int) -> int:
        """Capacity taken by a record of ``size`` bytes; tiers that allocate in units (pages) round it up."""
        return size

    def _scan(self) -> Iterator[tuple[BlockKey, int]]:
        """Existing (key, size) pairs found at start-up; tiers that survive restarts override this."""
        return iter(())

    # ---- public API --------------------------------------------------------------------------------
    def load_existing(self) -> int:
        """Adopt what the backend already holds (after a restart). Returns the number of blocks adopted."""
        with self._lock:
            count = 0
            for key, stored in self._scan():
                size = self._footprint(stored)
                if key in self._sizes:
                    continue
                if self.capacity and self._used + size > self.capacity:
                    self._discard(key)
                    continue
                self._sizes[key] = size
                self._used += size
                self.policy.on_insert(key, size)
                count += 1
            return count

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._sizes)

    def contains(self, key: BlockKey) -> bool:
        return key in self._sizes

    def keys(self) -> list[BlockKey]:
        with self._lock:
            return list(self._sizes)

    def put(self, key: BlockKey, record: bytes) -> list[Victim]:
        size = self._footprint(len(record))
        with self._lock:
            if self.capacity and size > self.capacity:
                raise TierFullError(f"tier {self.name}: record of {len(record)} bytes (takes {size}) exceeds "
                                    f"capacity {self.capacity}")
            old = self._sizes.get(key, 0)
            need = self._used - old + size - self.capacity if self.capacity else 0
            victims: list[Victim] = []
            if need > 0:
                # ``need`` already counts the old bytes of ``key`` as freed: evicting ``key`` itself would
                # count them twice (used > capacity) and hand back its stale record as a victim.
                self.policy.protect([key])
                try:
                    keys = self.policy.evict(need)
                finally:
                    self.policy.unprotect([key])
                if not keys:
                    raise TierFullError(f"tier {self.name}: no evictable room for {size} bytes")
                victims = [self._take(k) for k in keys]
            try:
                self._write(key, record)
            except TierError:
                self._forget(key)
                raise
            self._used += size - self._sizes.get(key, 0)
            self._sizes[key] = size
            self.policy.on_insert(key, size)
            return victims

    def get(self, key: BlockKey) -> bytes | None:
        with self._lock:
            if key not in self._sizes:
                return None
            self.policy.on_access(key)
            if not self.concurrent_reads:
                return self._read_or_forget(key)
        return self._read_or_forget(key)

    def _read_or_forget(self, key: BlockKey) -> bytes | None:
        try:
            record = self._read(key)
        except TierError as exc:
            log.warning("tier %s: read failed, treating as a miss: %s", self.name, exc)
            return None
        if record is None:
            self.delete(key)
        return record

    def delete(self, key: BlockKey) -> bool:
        with self._lock:
            if key not in self._sizes:
                return False
            self._forget(key)
            return True

    def close(self) -> None:
        """Release resources; a closed tier must not be used again."""

    # ---- helpers ----------------------------------------------------------------------------------
    def _take(self, key: BlockKey) -> Victim:
        """Remove an evicted key, returning its record for demotion (None if it cannot be read)."""
        try:
            record = self._read(key)
        except TierError as exc:
            log.warning("tier %s: cannot read victim for demotion: %s", self.name, exc)
            record = None
        self._drop(key)
        return key, record

    def _forget(self, key: BlockKey) -> None:
        self.policy.on_remove(key)
        self._drop(key)

    def _drop(self, key: BlockKey) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self._used -= size
        try:
            self._discard(key)
        except TierError as exc:
            log.warning("tier %s: discard failed: %s", self.name, exc)
