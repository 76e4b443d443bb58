"""SharedTier: the common base of tiers that several kvtier instances share (S3, Redis).

It keeps the Tier contract (kvtier/tiers/base.py) and differs from the base class where sharing matters:

- Network I/O runs *outside* the tier lock; only accounting runs under it, so batched and concurrent calls
  overlap. (Reading victims for demotion, only needed when ``capacity`` > 0, still happens under the lock.)
- ``get``/``get_many`` of keys missing from the local index still ask the backend, because another instance
  may have stored them; a hit is adopted into the index, unless the key was deleted while it was being read
  (no phantom entries). A key gone from the backend is a miss and is forgotten locally.
- Loads are bounded: they wait at most ``load_timeout_s`` in all (late results are dropped and the breaker
  opens), never probe a broken server themselves, and read at most ``max_record_bytes`` of any object (a
  larger one is refused unread and deleted). Saves use their own, longer timeouts, on background threads.
- ``contains`` stays local (no I/O on the lookup path); ``refresh_index()`` lists the backend (``entries``) and
  adopts keys other instances stored, and forgets keys that vanished. ``load_existing`` never deletes backend
  objects: they may belong to another instance.
- Backend failures are misses: ``get`` returns None, ``put`` raises TierError, and a CircuitBreaker makes
  calls fail fast while the server is unreachable.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

from kvtier.codecs import BlockCodec
from kvtier.errors import TierError, TierFullError
from kvtier.keys import KEY_SIZE, BlockKey
from kvtier.policies.base import EvictionPolicy
from kvtier.tiers.base import StoredBlock, Tier, Victim
from kvtier.tiers.breaker import CircuitBreaker, CircuitOpenError

log = logging.getLogger(__name__)


class TooLarge:
    """A fetch result: the object is larger than any valid record, so it was not read."""


TOO_LARGE = TooLarge()
Fetched = bytes | None | TooLarge
FetchJob = tuple[list[int], Callable[[], list[Fetched]]]  # (indices into the keys, a call that fetches them)


def parse_hex_key(text: str) -> BlockKey | None:
    """The key named by a 32-hex-digit object name, or None for anything else."""
    if len(text) != 2 * KEY_SIZE:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None


class SharedTier(Tier):
    """Base of shared network tiers; subclasses implement _write/_discard, ``_fetch_jobs``, ``_probe`` and
    ``entries``."""

    kind = "shared"
    shared = True  # TierStack.get asks the backend even for keys this instance has not seen
    persistent = True

    def __init__(self, name: str, capacity: int, codec: BlockCodec, policy: EvictionPolicy,
                 label: str, max_concurrency: int, load_timeout_s: float = 1.0) -> None:
        super().__init__(name, capacity, codec, policy)
        self.breaker = CircuitBreaker(label, probe=self._probe)
        self.label = label
        self.max_concurrency = max(1, max_concurrency)
        self.load_timeout_s = load_timeout_s
        self.malformed_entries = 0  # listing entries ignored because they made no sense (e.g. a bad size)
        # Told what the backend gained ("add", key, size) and lost ("remove", key, 0): a live placement index.
        self.listener: Callable[[str, BlockKey, int], None] | None = None
        self._reserved = 0  # bytes of puts in flight (bounded tiers): used + reserved <= capacity
        self._pool: ThreadPoolExecutor | None = None
        self._listing_is_complete = True  # False when ``entries`` reads a hint (a shared index), not the store
        self._generation = 0  # bumped by every delete; a read adopts its key only if no delete came since
        self._deleted_at: dict[BlockKey, int] = {}
        self._forgot_all_at = -1
        self._deleting: dict[BlockKey, int] = {}  # deletes in flight
        self._reads = 0

    # ---- what subclasses provide ---------------------------------------------------------------------
    @abstractmethod
    def entries(self, scope: str | None = None) -> Iterator[StoredBlock]:
        """Every record the backend holds under this tier's prefix (or ``scope``); TierError on failure."""

    @abstractmethod
    def _fetch_jobs(self, keys: Sequence[BlockKey]) -> list[FetchJob]:
        """Calls that fetch ``keys`` (each a record, None when absent, or TOO_LARGE), one per round trip."""

    @abstractmethod
    def _probe(self) -> None:
        """A cheap call that raises when the server does not answer (the breaker's background probe)."""

    def _index_removed(self, keys: Sequence[BlockKey]) -> None:
        """Hook: a read found these keys gone from the backend (a tier keeping a shared index drops them)."""

    def _read(self, key: BlockKey) -> bytes | None:
        """The object as stored (no adoption, no breaker check): for demotion reads and listings."""
        result = self._fetch_within_deadline([key])[0]
        return result if isinstance(result, bytes) else None

    # ---- Tier API --------------------------------------------------------------------------------------
    def put(self, key: BlockKey, record: bytes) -> list[Victim]:
        victims, delta = self._reserve(key, len(record))
        try:
            self._write(key, record)
        except TierError as exc:
            self._release(key, delta)
            exc.victims = victims
            raise
        except BaseException:  # never leak the reservation, whatever the client raised
            self._release(key, delta)
            raise
        self._commit(key, len(record), delta)
        return victims

    def get(self, key: BlockKey, touch: bool = True) -> bytes | None:
        return self._get_many([key], touch)[0]

    def get_many(self, keys: Sequence[BlockKey]) -> list[bytes | None]:
        """The record of each key (None: absent, unreadable, too large, or not back within the load timeout)."""
        return self._get_many(keys, True)

    def _get_many(self, keys: Sequence[BlockKey], touch: bool) -> list[bytes | None]:
        if not keys:
            return []
        try:
            self.breaker.check(may_probe=False)  # a load never waits on a server that just failed
        except CircuitOpenError:
            return [None] * len(keys)
        with self._lock:
            start_gen = self._generation
            self._reads += 1
        try:
            fetched = self._fetch_within_deadline(keys)
            out: list[bytes | None] = []
            for key, result in zip(keys, fetched):
                if isinstance(result, TooLarge):
                    log.warning("%s: object of block %s is larger than any valid record; deleted unread",
                                self.label, key.hex())
                    self.delete(key, force=True)
                    out.append(None)
                elif result is _TIMED_OUT:
                    out.append(None)
                else:  # adopted only if no delete overlapped the read: while ``_reads`` counts this one
                    out.append(self._after_read(key, result, start_gen, touch))  # type: ignore[arg-type]
        finally:
            with self._lock:
                self._reads -= 1
                if not self._reads:
                    self._deleted_at.clear()
        return out

    def delete(self, key: BlockKey, force: bool = False) -> bool:
        """Forget ``key`` and delete its object (also when not indexed here, with ``force``). A read that
        overlaps any part of this (until the backend has answered) never adopts the key again."""
        with self._lock:
            held = key in self._sizes
            self._unaccount(key)
            self._mark_deleted(key)
            self._deleting[key] = self._deleting.get(key, 0) + 1
        try:
            if held or force:
                try:
                    self._discard(key)
                    self._tell("remove", key)
                except TierError as exc:
                    self._note_failure("delete", exc)
        finally:
            with self._lock:
                self._mark_deleted(key)
                left = self._deleting.pop(key) - 1
                if left:
                    self._deleting[key] = left
        return held

    def _mark_deleted(self, key: BlockKey) -> None:
        self._generation += 1
        if self._reads:
            self._deleted_at[key] = self._generation

    def _forgotten_all(self) -> None:
        self._generation += 1  # a read in flight must not re-adopt what was just forgotten
        self._forgot_all_at = self._generation

    def discard_forgotten(self, key: BlockKey) -> None:
        """Shared objects may serve other instances: forgetting them locally is all a reset does."""

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
            start_gen = self._generation
            self._reads += 1
        try:
            listed = {block.key: block.size for block in self.entries()}
        finally:
            with self._lock:
                self._reads -= 1
        adopted = 0
        with self._lock:
            for key, size in listed.items():
                if key not in self._sizes and not self._deleted_since(key, start_gen) and self._adopt(key, size):
                    adopted += 1
            if self._listing_is_complete:
                # Keys indexed before the listing began were written before it began, so a complete
                # listing that lacks them means they were deleted or expired.
                for key in before - listed.keys():
                    self._unaccount(key)
            if not self._reads:
                self._deleted_at.clear()
        return adopted

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # ---- loads within a deadline -----------------------------------------------------------------------
    def _fetch_within_deadline(self, keys: Sequence[BlockKey]) -> list[object]:
        results: list[object] = [_TIMED_OUT] * len(keys)
        jobs = self._fetch_jobs(keys)
        pool = self._executor()
        futures: list[tuple[list[int], Future[list[Fetched]]]] = [(idx, pool.submit(call)) for idx, call in jobs]
        done, pending = wait([f for _, f in futures], timeout=self.load_timeout_s)
        for indices, future in futures:
            if future not in done:
                continue
            try:
                values = future.result()
            except TierError as exc:
                self._note_failure("read", exc)
                values = [None] * len(indices)
            except Exception as exc:  # anything a client raises is a miss, never an error
                log.warning("%s: read failed: %s: %s", self.label, type(exc).__name__, exc)
                values = [None] * len(indices)
            for i, value in zip(indices, values):
                results[i] = value
        if pending:
            self.breaker.record_failure(f"no answer within the {self.load_timeout_s:g} s load timeout")
        return results

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

    def _take(self, key: BlockKey) -> Victim:
        """An evicted key's record, read for demotion (its backend object is then deleted)."""
        record = self._read(key)
        self._mark_deleted(key)
        self._drop(key)
        self._mark_deleted(key)
        self._tell("remove", key)
        return key, record

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
        self._tell("add", key, size)

    def _tell(self, change: str, key: BlockKey, size: int = 0) -> None:
        if self.listener is not None:
            try:
                self.listener(change, key, size)
            except Exception as exc:  # a placement index is a hint: never fail storage over it
                log.debug("%s: placement listener failed: %s", self.label, exc)

    def _adopt(self, key: BlockKey, size: int) -> bool:
        """Index a key another instance stored, if its size makes sense and it fits without evicting."""
        if size <= 0 or (self.max_record_bytes is not None and size > self.max_record_bytes):
            self.malformed_entries += 1
            return False
        if self.capacity and self._used + self._reserved + size > self.capacity:
            return False
        self._used += size
        self._sizes[key] = size
        self.policy.on_insert(key, size)
        return True

    def _deleted_since(self, key: BlockKey, generation: int) -> bool:
        return (key in self._deleting or self._deleted_at.get(key, -1) > generation
                or self._forgot_all_at > generation)

    def _unaccount(self, key: BlockKey) -> None:
        """Forget a key locally without touching the backend (lock held)."""
        size = self._sizes.pop(key, None)
        if size is not None:
            self._used -= size
            self.policy.on_remove(key)

    def _after_read(self, key: BlockKey, record: bytes | None, start_gen: int, touch: bool = True) -> bytes | None:
        if record is None:
            with self._lock:
                held = key in self._sizes
                self._unaccount(key)
            if held:
                self._index_removed([key])
            self._tell("remove", key)  # gone: an index that still lists it is cleaned up on this miss
            return None
        with self._lock:
            if key in self._sizes:
                if touch:
                    self.policy.on_access(key)
            elif not self._deleted_since(key, start_gen) and self._adopt(key, len(record)) and touch:
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


_TIMED_OUT = object()
