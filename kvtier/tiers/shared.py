"""SharedTier: the common base of tiers that several kvtier instances share (S3, Redis).

It keeps the Tier contract (kvtier/tiers/base.py) and differs from the base class where sharing matters:

- Network I/O runs *outside* the tier lock; only accounting runs under it, so batched and concurrent calls
  overlap. (Reading victims for demotion, only needed when ``capacity`` > 0, still happens under the lock.)
- ``get`` of a key missing from the local index still asks the backend, because another instance may have
  stored it; a hit is adopted into the index. A key gone from the backend (expired, deleted elsewhere) is a
  miss and is forgotten locally without a delete round trip.
- ``contains`` stays local (no I/O on the lookup path); ``refresh_index()`` lists the backend (``entries``) and
  adopts keys other instances stored, and forgets keys that vanished. ``load_existing`` never deletes backend objects:
  they may belong to another instance.
- Backend failures are misses: ``get`` returns None, ``put`` raises TierError, and a CircuitBreaker makes
  calls fail fast while the server is unreachable.
- ``get_many``/``put_many`` run a batch with bounded concurrency (Redis pipelines it instead).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from kvtier.codecs import BlockCodec
from kvtier.errors import TierError, TierFullError
from kvtier.keys import KEY_SIZE, BlockKey
from kvtier.policies.base import EvictionPolicy
from kvtier.redact import redact_url
from kvtier.tiers.base import BatchPutResult, StoredBlock, Tier, Victim
from kvtier.tiers.breaker import CircuitBreaker, CircuitOpenError

log = logging.getLogger(__name__)


def parse_hex_key(text: str) -> BlockKey | None:
    """The key named by a 32-hex-digit object name, or None for anything else."""
    if len(text) != 2 * KEY_SIZE:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None


class SharedTier(Tier):
    """Base of shared network tiers; subclasses implement _write/_read/_discard and ``entries``."""

    kind = "shared"
    shared = True  # TierStack.get asks the backend even for keys this instance has not seen
    persistent = True

    def __init__(self, name: str, capacity: int, codec: BlockCodec, policy: EvictionPolicy,
                 label: str, max_concurrency: int) -> None:
        super().__init__(name, capacity, codec, policy)
        self.breaker = CircuitBreaker(label)
        self.label = label
        self.max_concurrency = max(1, max_concurrency)
        self._reserved = 0  # bytes of puts in flight (bounded tiers): used + reserved <= capacity
        self._pool: ThreadPoolExecutor | None = None
        self._listing_is_complete = True  # False when ``_list`` reads a hint (a shared index), not the store

    @abstractmethod
    def entries(self, scope: str | None = None) -> Iterator[StoredBlock]:
        """Every record the backend holds under this tier's prefix (or ``scope``); TierError on failure."""

    def _index_removed(self, keys: Sequence[BlockKey]) -> None:
        """Hook: a read found these keys gone from the backend (a tier keeping a shared index drops them)."""

    # ---- Tier API --------------------------------------------------------------------------------------
    def put(self, key: BlockKey, record: bytes) -> list[Victim]:
        victims, delta = self._reserve(key, len(record))
        try:
            self._write(key, record)
        except BaseException:  # never leak the reservation, whatever the client raised
            self._release(key, delta)
            raise
        self._commit(key, len(record), delta)
        return victims

    def get(self, key: BlockKey, touch: bool = True) -> bytes | None:
        try:
            record = self._read(key)
        except TierError as exc:
            self._note_failure("read", exc)
            return None
        return self._after_read(key, record, touch)

    def delete(self, key: BlockKey) -> bool:
        with self._lock:
            held = key in self._sizes
            self._unaccount(key)
        if held:
            try:
                self._discard(key)
            except TierError as exc:
                self._note_failure("delete", exc)
        return held

    def load_existing(self) -> int:
        try:
            return self.refresh_index()
        except TierError as exc:
            log.warning("%s: cannot list existing blocks at start-up: %s", self.label, exc)
            return 0

    def refresh_index(self) -> int:
        """Adopt blocks other instances stored (and forget ones that vanished). Returns how many were adopted.

        Raises TierError when the backend cannot be listed; the local index is then unchanged.
        """
        with self._lock:
            before = set(self._sizes)
        listed = {block.key: block.size for block in self.entries()}
        adopted = 0
        with self._lock:
            for key, size in listed.items():
                if key not in self._sizes and self._adopt(key, size):
                    adopted += 1
            if self._listing_is_complete:
                # Keys indexed before the listing began were written before it began, so a complete
                # listing that lacks them means they were deleted or expired.
                for key in before - listed.keys():
                    self._unaccount(key)
        return adopted

    def get_many(self, keys: Sequence[BlockKey]) -> list[bytes | None]:
        """``get`` of each key (same order), ``max_concurrency`` at a time."""
        if len(keys) <= 1:
            return [self.get(k) for k in keys]
        return list(self._executor().map(self.get, keys))

    def put_many(self, items: Iterable[tuple[BlockKey, bytes]]) -> BatchPutResult:
        """``put`` of each (key, record), ``max_concurrency`` at a time; failures are reported, not raised."""
        result = BatchPutResult()

        def one(item: tuple[BlockKey, bytes]) -> tuple[BlockKey, list[Victim] | TierError]:
            try:
                return item[0], self.put(item[0], item[1])
            except TierError as exc:
                return item[0], exc

        for key, outcome in self._executor().map(one, list(items)):
            if isinstance(outcome, TierError):
                result.failed[key] = outcome
            else:
                result.victims.extend(outcome)
        return result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ---- accounting (all under the lock) ---------------------------------------------------------------
    def _reserve(self, key: BlockKey, size: int) -> tuple[list[Victim], int]:
        """Make room for ``size`` bytes of ``key`` before writing it; returns (victims, reserved bytes)."""
        if not self.capacity:
            return [], 0
        with self._lock:
            if size > self.capacity:
                raise TierFullError(f"{self.label}: record of {size} bytes exceeds capacity {self.capacity}")
            delta = size - self._sizes.get(key, 0)
            need = self._used + self._reserved + delta - self.capacity
            victims: list[Victim] = []
            if need > 0:
                self.policy.protect([key])  # the key being replaced must not be its own victim
                try:
                    evict = self.policy.evict(need)
                finally:
                    self.policy.unprotect([key])
                if not evict:
                    raise TierFullError(f"{self.label}: no evictable room for {size} bytes")
                victims = [self._take(k) for k in evict]
            self._reserved += max(delta, 0)
            self.policy.protect([key])  # no other put may evict it while its new bytes are in flight
            return victims, max(delta, 0)

    def _release(self, key: BlockKey, reserved: int) -> None:
        if self.capacity:
            with self._lock:
                self._reserved -= reserved
                self.policy.unprotect([key])

    def _commit(self, key: BlockKey, size: int, reserved: int) -> None:
        with self._lock:
            if self.capacity:
                self._reserved -= reserved
                self.policy.unprotect([key])
            self._used += size - self._sizes.get(key, 0)
            self._sizes[key] = size
            self.policy.on_insert(key, size)

    def _adopt(self, key: BlockKey, size: int) -> bool:
        """Index a key another instance stored, if it fits without evicting (lock held)."""
        if self.capacity and self._used + self._reserved + size > self.capacity:
            return False
        self._used += size
        self._sizes[key] = size
        self.policy.on_insert(key, size)
        return True

    def _unaccount(self, key: BlockKey) -> None:
        """Forget a key locally without touching the backend (lock held)."""
        size = self._sizes.pop(key, None)
        if size is not None:
            self._used -= size
            self.policy.on_remove(key)

    def _after_read(self, key: BlockKey, record: bytes | None, touch: bool = True) -> bytes | None:
        if record is None:
            with self._lock:
                held = key in self._sizes
                self._unaccount(key)
            if held:
                self._index_removed([key])
            return None
        with self._lock:
            if (key in self._sizes or self._adopt(key, len(record))) and touch:
                self.policy.on_access(key)
        return record

    # ---- helpers ---------------------------------------------------------------------------------------
    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix=f"kvtier-{self.name}")
        return self._pool

    def _note_failure(self, op: str, exc: TierError) -> None:
        """A failure turned into a miss. Outages are logged once by the breaker; other errors here."""
        if isinstance(exc, CircuitOpenError) or self.breaker.is_open:
            log.debug("%s: %s failed: %s", self.label, op, exc)
        else:
            log.warning("%s: %s failed, treating as a miss: %s", self.label, op, exc)
