"""Tier ABC: a byte-capacity store of encoded block records, with eviction by its policy.

Subclasses implement the raw storage primitives (``_write``, ``_read``, ``_discard``) and, for storage that
outlives the process, the listing (``entries``, ``read_heads``, ``remove``); this base class owns capacity
accounting, the policy and the lock, so every tier evicts the same way. A tier kind is a subclass registered in
kvtier.plugins.TIERS (or named ``package.module:Class`` in a config) that declares its options dataclass.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from kvtier.codecs import BlockCodec
from kvtier.errors import TierError, TierFullError
from kvtier.keys import BlockKey
from kvtier.policies.base import EvictionPolicy

log = logging.getLogger(__name__)

Victim = tuple[BlockKey, bytes | None]  # key and its record (None when the record could not be read back)
R = TypeVar("R")


@dataclass
class BatchPutResult:
    """What ``put_many`` did: the victims evicted to make room, and the keys that were not stored."""

    victims: list[Victim] = field(default_factory=list)
    failed: dict[BlockKey, TierError] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class NoOptions:
    """Options of a tier kind that has none beyond the common keys."""


@dataclass(frozen=True)
class StoredBlock:
    """One record as its tier's storage lists it (``Tier.entries``)."""

    key: BlockKey
    name: str             # file path, object key or Redis key
    namespace: str        # disk directory, S3 prefix, Redis key prefix
    size: int             # stored bytes
    age_s: float | None   # since written (disk, S3) or last used (Redis); None when unknown


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

    kind: ClassVar[str] = "base"
    max_record_bytes: int | None = None  # set by the stack once a block's size is known: larger reads are refused
    Options: ClassVar[type] = NoOptions  # the kind-specific config keys (a frozen dataclass); see kvtier.config
    default_codec: ClassVar[str] = "none"
    hit_source: ClassVar[str] = "external"  # what vLLM's hit-source metrics call it: "host", "disk", "external"
    persistent: ClassVar[bool] = False  # holds blocks across restarts (the scheduler lists them at start-up)
    shared: ClassVar[bool] = False  # other instances may store into it: a miss in the local index still asks
    # True when ``_read`` is safe without the lock (e.g. files replaced atomically): parallel reads overlap.
    concurrent_reads: ClassVar[bool] = False
    # True when records live in this process's memory: a hit of a ``copies_only`` record is a memory copy and a
    # checksum, which hold the GIL, so the stack does them on the calling thread (no thread hand-offs).
    in_memory: ClassVar[bool] = False
    # Set by the stack: whether the tier below holds a key (an index lookup). An evicted block it holds is not
    # read back out for demotion (e.g. a block promoted from disk and evicted again).
    held_below: Callable[[BlockKey], bool] | None = None

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

    @classmethod
    def check_config(cls, capacity: int, options: Any) -> None:
        """Raise ConfigError (message starting with the key) for settings this kind cannot run with."""

    @classmethod
    def transport_warnings(cls, options: Any) -> list[str]:
        """What is unsafe about how this tier reaches its storage (no TLS, no auth on a remote host)."""
        return []

    # ---- listing: what the storage holds, for start-up, inspect and gc ------------------------------
    def entries(self, scope: str | None = None) -> Iterator[StoredBlock]:
        """The records the storage holds. ``scope`` widens a listing beyond this tier's own namespace (an S3
        prefix, a Redis key prefix) where the storage has such a thing. The base class lists its index."""
        for key in self.keys():
            yield StoredBlock(key, key.hex(), self.name, self._sizes.get(key, 0), None)

    def location(self, scope: str | None = None) -> str:
        """Where the records live, for messages (never with credentials)."""
        return f"tier {self.name}"

    def read_heads(self, blocks: Sequence[StoredBlock], size: int) -> list[bytes | None]:
        """The first ``size`` bytes of each listed record (None when it cannot be read). Tiers override this to
        read only those bytes; the base class reads whole records."""
        out: list[bytes | None] = []
        for block in blocks:
            try:
                record = self._read(block.key)
            except TierError:
                record = None
            out.append(None if record is None else record[:size])
        return out

    def remove(self, blocks: Sequence[StoredBlock]) -> None:
        """Delete listed records from the storage (and forget those this instance indexed)."""
        for block in blocks:
            self.delete(block.key)

    # ---- public API --------------------------------------------------------------------------------
    def load_existing(self) -> int:
        """Adopt what the storage already holds (after a restart), newest first while it fits; records beyond
        the capacity are deleted. Returns the number of blocks adopted."""
        newest_first = sorted(self.entries(), key=lambda b: b.age_s if b.age_s is not None else float("inf"))
        with self._lock:
            chosen: list[tuple[BlockKey, int]] = []
            room = self.capacity - self._used if self.capacity else None
            for block in newest_first:
                size = self._footprint(block.size)
                if block.key in self._sizes:
                    continue
                if room is not None:
                    if size > room:
                        self._discard_quietly(block.key)
                        continue
                    room -= size
                chosen.append((block.key, size))
            for key, size in reversed(chosen):  # oldest first into the policy, so recency order survives
                self._sizes[key] = size
                self._used += size
                self.policy.on_insert(key, size)
            return len(chosen)

    def with_policy(self, fn: Callable[[Any], R]) -> R:
        """Run ``fn(self.policy)`` under the tier's lock (policies are not thread-safe by themselves)."""
        with self._lock:
            return fn(self.policy)

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._sizes)

    def can_hold(self, record_size: int) -> bool:
        """Whether a record of ``record_size`` bytes fits in this tier at all (when it is empty)."""
        return not self.capacity or self._footprint(record_size) <= self.capacity

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
            except TierError as exc:
                self._forget(key)
                exc.victims = victims  # pushed out already: the caller demotes them all the same
                raise
            self._used += size - self._sizes.get(key, 0)
            self._sizes[key] = size
            self.policy.on_insert(key, size)
            return victims

    def get(self, key: BlockKey, touch: bool = True) -> bytes | None:
        """The record of ``key`` or None; ``touch=False`` leaves the access to an earlier ``touch_many``."""
        return self._lookup(key, touch, self._read)  # type: ignore[return-value]

    def view(self, key: BlockKey, touch: bool = True) -> bytes | memoryview | None:
        """``get``, but the record may be a view of memory the tier reuses (its own, or a per-thread read buffer
        that the same thread's next ``view`` overwrites): only for a caller that copies the bytes out and
        verifies the copy before it reads another record on that thread (TierStack.load_many)."""
        return self.get(key, touch)

    def _lookup(self, key: BlockKey, touch: bool,
                read: Callable[[BlockKey], bytes | memoryview | None]) -> bytes | memoryview | None:
        """``read(key)`` of a held key (an access for the policy with ``touch``); a record gone is forgotten."""
        with self._lock:
            if key not in self._sizes:
                return None
            if touch:
                self.policy.on_access(key)
            if not self.concurrent_reads:
                return self._read_or_forget(key, read)
        return self._read_or_forget(key, read)

    def touch_many(self, keys: Sequence[BlockKey]) -> None:
        """Tell the policy that the held ``keys`` are being read, in this order (a parallel read that follows
        with ``touch=False`` would otherwise record them in whatever order its threads ran)."""
        with self._lock:
            for key in keys:
                if key in self._sizes:
                    self.policy.on_access(key)

    def get_many(self, keys: Sequence[BlockKey]) -> list[bytes | None]:
        """``get`` of each key, same order. Network tiers batch the round trips."""
        return [self.get(key) for key in keys]

    def put_many(self, items: Iterable[tuple[BlockKey, bytes]]) -> BatchPutResult:
        """``put`` of each (key, record); failures are reported in the result, not raised."""
        result = BatchPutResult()
        for key, record in items:
            try:
                result.victims.extend(self.put(key, record))
            except TierError as exc:
                result.failed[key] = exc
        return result

    def _read_or_forget(self, key: BlockKey,
                        read: Callable[[BlockKey], bytes | memoryview | None]) -> bytes | memoryview | None:
        try:
            record = read(key)
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

    def forget_all(self) -> list[BlockKey]:
        """Drop every key from the index and the policy at once (no storage I/O); returns the keys. Their
        storage is then freed with ``discard_forgotten`` (possibly in the background)."""
        with self._lock:
            keys = list(self._sizes)
            for key in keys:
                self.policy.on_remove(key)
            self._sizes.clear()
            self._used = 0
            self._forgotten_all()
            return keys

    def _forgotten_all(self) -> None:
        """Hook (lock held): release per-key state ``forget_all`` dropped (e.g. DRAM pages)."""

    def discard_forgotten(self, key: BlockKey) -> None:
        """Free the storage of a key dropped by ``forget_all``, unless it was stored again since."""
        with self._lock:
            if key in self._sizes:
                return
            self._discard_quietly(key)

    def close(self) -> None:
        """Release resources; a closed tier must not be used again."""

    # ---- helpers ----------------------------------------------------------------------------------
    def _take(self, key: BlockKey) -> Victim:
        """Remove an evicted key, returning its record for demotion (None if it cannot be read, or when
        ``held_below`` says the next tier down holds the block already: nothing to copy out)."""
        record: bytes | None = None
        if self.held_below is None or not self.held_below(key):
            try:
                record = self._read(key)
            except TierError as exc:
                log.warning("tier %s: cannot read victim for demotion: %s", self.name, exc)
        self._drop(key)
        return key, record

    def _forget(self, key: BlockKey) -> None:
        self.policy.on_remove(key)
        self._drop(key)

    def _drop(self, key: BlockKey) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self._used -= size
        self._discard_quietly(key)

    def _discard_quietly(self, key: BlockKey) -> None:
        try:
            self._discard(key)
        except TierError as exc:
            log.warning("tier %s: discard failed: %s", self.name, exc)
