"""TierStack: the ordered hierarchy of tiers (fastest first) that the connector talks to.

- put: encode with the top tier's codec and store there; victims are demoted one tier down (re-encoded with
  that tier's codec when the formats differ) and dropped from the last tier. Write-through tiers also get
  every put.
- get / get_many: the first tier that holds the key answers; the record is verified (checksum, key, sizes,
  and the raw size a block has here, before anything is allocated). A record that fails verification is
  deleted and reported as a miss, never returned. Shared tiers serve a request's keys in one batch. On a hit
  below the top tier the block is promoted (copied up) when ``promote_on_hit`` is set, on the ``background``
  runner when one is given (never on the request's path then). With ``promote_on_hit=True`` a PromotionGate
  (promotion.py) measures whether promoted blocks are hit before the top tier evicts them and promotes only a
  sample while they are not; ``"always"`` promotes every hit.
- A victim on its way down (evicted from one tier, not yet written to the next) stays readable: get and where
  also look at the records in transit, so a concurrent load never misses a block that is only being demoted.

A tier error, or any exception out of a tier or codec on the read path, is a miss: it is counted, logged once
per tier and error kind, and never raised to the caller.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from kvtier.codecs import RawBytes, checksum_parts, max_record_size
from kvtier.errors import CorruptBlockError, TierError, TierFullError
from kvtier.keys import BlockKey
from kvtier.metrics import StoreMetrics
from kvtier.tiers.base import Tier, Victim
from kvtier.tiers.feedback import PolicyFeedback
from kvtier.tiers.promotion import PromotionGate
from kvtier.tiers.transit import InTransit

if TYPE_CHECKING:
    from kvtier.config import KVTierConfig

log = logging.getLogger(__name__)
Found = tuple[RawBytes, str]  # verified raw bytes (perhaps a view of the record) and the tier that served them
# Copies block i's raw bytes to where they are used, yielding that memory in record order as each part lands.
Place = Callable[[int, RawBytes], Iterable[Any]]
MapFn = Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]]


def _discarder(tier: Tier, keys: list[BlockKey]) -> Callable[[], None]:
    def discard() -> None:
        for key in keys:
            tier.discard_forgotten(key)
    return discard


class TierStack(PolicyFeedback):
    def __init__(self, tiers: Sequence[Tier], promote_on_hit: bool | str = True,
                 write_through: Sequence[str] = (), metrics: StoreMetrics | None = None,
                 on_change: Callable[[BlockKey, str | None], None] | None = None,
                 background: Callable[[Callable[[], None]], None] | None = None) -> None:
        if not tiers:
            raise ValueError("a TierStack needs at least one tier")
        self.tiers = list(tiers)
        for upper, lower in zip(self.tiers, self.tiers[1:]):
            upper.held_below = lower.contains
        self.promote_on_hit = promote_on_hit
        self.promotion = PromotionGate() if promote_on_hit is True else None  # "always": no gate
        self.write_through = [t for t in self.tiers if t.name in set(write_through)]
        self.metrics = metrics or StoreMetrics()
        self._logged: set[tuple[str, str]] = set()
        # Told where a key now lives (tier name) or that no tier holds it any more (None).
        self.on_change = on_change or (lambda key, tier: None)
        # Runs promotions off the caller's path when set (e.g. a thread pool's submit); inline otherwise.
        self.background = background
        self._raw_size: int | None = None
        self._top = 0  # the first tier that can hold a block: saves and promotions go there
        self._transit = InTransit()  # victims between their eviction and their landing one tier down

    @property
    def raw_size(self) -> int | None:
        """Bytes of one block in this engine, once known: a record of any other raw size is corrupt, and no
        tier reads an object larger than the largest valid record of that size."""
        return self._raw_size

    @raw_size.setter
    def raw_size(self, value: int | None) -> None:
        self._raw_size = value
        self._top = 0
        for index, tier in enumerate(self.tiers):
            tier.max_record_bytes = None if value is None else max_record_size(value)
            if value is not None and self._top == index and not tier.can_hold(tier.codec.min_record_size(value)):
                self._top = index + 1  # a save or promotion would encode a record only for the tier to refuse it
                log.warning("kvtier tier %s: its capacity (%d bytes) cannot hold one block (%d bytes); blocks are "
                            "stored from the tier below it on", tier.name, tier.capacity, value)

    @classmethod
    def from_config(cls, cfg: KVTierConfig, metrics: StoreMetrics | None = None,
                    on_change: Callable[[BlockKey, str | None], None] | None = None,
                    background: Callable[[Callable[[], None]], None] | None = None) -> TierStack:
        from kvtier.tiers.factory import make_tiers

        return cls(make_tiers(cfg), cfg.promote_on_hit, [t.name for t in cfg.tiers if t.write_through], metrics,
                   on_change, background)

    # ---- writes --------------------------------------------------------------------------------
    def put(self, key: BlockKey, raw: bytes | memoryview) -> bool:
        """Store a block's raw bytes. Returns False when no tier accepted it (the caller loses nothing)."""
        return self.put_many([(key, raw)])[0]

    def put_many(self, items: Sequence[tuple[BlockKey, bytes | memoryview]]) -> list[bool]:
        """``put`` of each (key, raw bytes); write-through tiers receive the items they lack as one batch."""
        if self._top >= len(self.tiers):
            return [False] * len(items)
        top = self.tiers[self._top]
        stored = [self._put_into(self._top, key, top.codec.encode(key, raw)) for key, raw in items]
        for tier in self.write_through:
            if tier is top:
                continue
            batch = [(key, tier.codec.encode(key, raw)) for key, raw in items if not tier.contains(key)]
            if batch:
                self._put_batch(self.tiers.index(tier), batch)
        return stored

    def _put_batch(self, index: int, batch: list[tuple[BlockKey, bytes]]) -> None:
        tier = self.tiers[index]
        start = time.perf_counter()
        try:
            result = tier.put_many(batch)
        except Exception as exc:  # a failing write-through tier costs only its copies
            self._fail(tier, "error", exc)
            return
        self.metrics.observe(tier.name, "put", (time.perf_counter() - start) / len(batch))
        for key, exc in result.failed.items():
            self._fail(tier, "full" if isinstance(exc, TierFullError) else "error", exc)
        for key, record in batch:
            if key not in result.failed:
                self.metrics.add(tier.name, "puts")
                self.metrics.add(tier.name, "bytes_written", len(record))
                self.on_change(key, tier.name)
        self._demote_all(index, result.victims)

    def _put_into(self, index: int, key: BlockKey, record: bytes, cascade: bool = True) -> bool:
        tier = self.tiers[index]
        start = time.perf_counter()
        try:
            victims = tier.put(key, record)
        except TierError as exc:
            self._fail(tier, "full" if isinstance(exc, TierFullError) else "error", exc)
            self._demote_all(index, exc.victims)  # what the failed put pushed out still goes down a tier
            return self._put_below(index, key, record) if cascade else False
        self.metrics.observe(tier.name, "put", time.perf_counter() - start)
        self.metrics.add(tier.name, "puts")
        self.metrics.add(tier.name, "bytes_written", len(record))
        self.on_change(key, tier.name)
        self._demote_all(index, victims)
        return True

    def _demote_all(self, index: int, victims: list[Victim]) -> None:
        self._transit.begin(index, victims)
        for victim in victims:
            self.metrics.add(self.tiers[index].name, "evictions")
            if index == 0 and self.promotion is not None:
                self.promotion.evicted(victim[0])
            try:
                self._demote(index, victim)
            finally:
                self._transit.end(victim[0], index)

    def _put_below(self, index: int, key: BlockKey, record: bytes) -> bool:
        """A tier refused the record: try the next one down (re-encoded for it)."""
        if index + 1 >= len(self.tiers):
            return False
        converted = self._convert(index, key, record)
        return converted is not None and self._put_into(index + 1, key, converted)

    def _demote(self, index: int, victim: Victim) -> None:
        key, record = victim
        if index + 1 < len(self.tiers) and self.tiers[index + 1].contains(key):  # not read out: Tier.held_below
            self.on_change(key, self.tiers[index + 1].name)
            return
        if index + 1 < len(self.tiers) and record is not None:
            converted = self._convert(index, key, record)
            if converted is not None and self._put_into(index + 1, key, converted):
                self.metrics.add(self.tiers[index].name, "demotions")
                return
        self.metrics.add(self.tiers[index].name, "drops")
        self._transit.end(key, index)
        self.on_change(key, self.where(key))

    def _convert(self, index: int, key: BlockKey, record: bytes) -> bytes | None:
        src, dst = self.tiers[index], self.tiers[index + 1]
        if src.codec.same_format(dst.codec):
            return record
        raw = self._decode(src, key, record)
        return None if raw is None else dst.codec.encode(key, raw)

    def _decode(self, tier: Tier, key: BlockKey, record: bytes | memoryview, i: int = 0,
                place: Place | None = None) -> RawBytes | None:
        """The verified raw bytes of ``tier``'s record, or None for a record that fails verification (counted
        and logged). With ``place`` they are copied through it as block ``i`` and what landed is verified."""
        try:
            if place is None:
                return tier.codec.decode(key, record, self.raw_size)
            raw, head = tier.codec.open(key, record, self.raw_size)
            if checksum_parts(place(i, raw), head.checksum_alg) != head.checksum:
                raise CorruptBlockError("checksum mismatch (of the bytes copied out)")
            return raw
        except CorruptBlockError as exc:
            self.metrics.add(tier.name, "checksum_failures")
            self._fail(tier, "corrupt", exc)
            return None

    # ---- reads ---------------------------------------------------------------------------------
    def get(self, key: BlockKey) -> Found | None:
        """Verified raw bytes and the name of the tier that served them, or None (a miss)."""
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[BlockKey], map_fn: MapFn = map) -> list[Found | None]:
        """``get`` of each key (same order). Local tiers read and verify through ``map_fn`` (e.g. a thread
        pool's map, for parallel reads); shared tiers fetch the keys they may hold in one batch."""
        return self._fetch(keys, map_fn, None)

    def load_many(self, keys: Sequence[BlockKey], place: Place, map_fn: MapFn = map) -> list[str | None]:
        """``get_many`` straight into the caller's memory: ``place(i, raw)`` copies key i's bytes to where they
        are used and yields that memory, in record order, as each part lands. The checksum is taken over what
        it yields, so the top tier's records are read in place (``Tier.view``, no copy) and a record that
        changes while it is copied is a miss like a corrupt one. Returns the serving tier per key, or None; a
        miss's memory may have been written (the caller must not use it)."""
        return [None if found is None else found[1] for found in self._fetch(keys, map_fn, place)]

    def _fetch(self, keys: Sequence[BlockKey], map_fn: MapFn, place: Place | None) -> list[Found | None]:
        """With ``place`` a hit's raw bytes are where ``place`` copied them: the Found carries b"" instead."""
        found: list[Found | None] = [None] * len(keys)
        landed = self._transit.landed
        missing = list(range(len(keys)))
        for index, tier in enumerate(self.tiers):
            wanted = [i for i in missing if tier.shared or tier.contains(keys[i])]
            if not wanted:
                continue
            each = map if tier.in_memory and tier.codec.copies_only else map_fn  # threads only gain on decodes
            for i, raw in zip(wanted, self._serve(index, tier, keys, wanted, each, place)):
                if raw is not None:
                    found[i] = (raw, tier.name)
                    if index == 0 and self.promotion is not None:
                        self.promotion.hit(keys[i])
            missing = [i for i in missing if found[i] is None]
        for i in missing:  # a demotion in flight, or one that landed below a tier we had already passed
            found[i] = self._get_in_transit(keys[i], i, place)
            if found[i] is None and self._transit.landed != landed:
                found[i] = self._rescan(keys[i], i, place)
            if found[i] is None:
                self.metrics.add("all", "misses")
                self.on_change(keys[i], self.where(keys[i]))
        return found

    def _serve(self, index: int, tier: Tier, keys: Sequence[BlockKey], wanted: list[int], each: MapFn,
               place: Place | None) -> Iterable[RawBytes | None]:
        """Each wanted key's verified raw bytes (placed, with ``place``) or None. A local tier's record is read,
        verified and placed in one job: used while in cache, and with ``place`` it may be a view of memory the
        tier reuses (``Tier.view``: the disk tier's per-thread read buffer), as nothing keeps it."""
        def hit(i: int, record: bytes | memoryview | None) -> RawBytes | None:
            return None if record is None else self._hit(index, tier, keys[i], record, i, place)

        if tier.shared and len(wanted) > 1:
            return each(lambda job: hit(*job), zip(wanted, self._read_batch(tier, [keys[i] for i in wanted])))
        touch = len(wanted) == 1 or each is map
        if not touch:
            tier.touch_many([keys[i] for i in wanted])  # the policy sees the reads in key order, not thread order
        read = tier.view if place is not None else tier.get
        return each(lambda i: hit(i, self._read_one(tier, keys[i], read, touch)), wanted)

    def _read_one(self, tier: Tier, key: BlockKey, read: Callable[..., bytes | memoryview | None],
                  touch: bool) -> bytes | memoryview | None:
        start = time.perf_counter()
        try:
            record = read(key, touch=touch)
        except Exception as exc:  # a tier failing in any way is a miss for this key, never an error
            self._fail(tier, "read", exc)
            return None
        if record is not None:
            self.metrics.observe(tier.name, "get", time.perf_counter() - start)
        return record

    def _read_batch(self, tier: Tier, keys: list[BlockKey]) -> list[bytes | None]:
        """A shared tier's records of ``keys`` in one batch (its round trips overlap)."""
        start = time.perf_counter()
        try:
            records = list(tier.get_many(keys))
        except Exception as exc:  # a tier failing in any way is a miss for these keys, never an error
            self._fail(tier, "read", exc)
            return [None] * len(keys)
        each = (time.perf_counter() - start) / max(1, len(keys))  # a batch's time, shared by the records it read
        for record in records:
            if record is not None:
                self.metrics.observe(tier.name, "get", each)
        return records

    def _hit(self, index: int, tier: Tier, key: BlockKey, record: bytes | memoryview, i: int,
             place: Place | None) -> RawBytes | None:
        """A record read from ``tier``, verified (and placed); promoted from a lower tier when asked (a copy of
        it when the record is a view of memory its tier reuses)."""
        raw = self._verified(tier, key, record, i, place)
        if raw is None:
            return None
        if index > 0 and self.promote_on_hit:
            self._promote(tier, key, raw, copy=isinstance(record, memoryview))
        return raw if place is None else b""

    def _verified(self, tier: Tier, key: BlockKey, record: bytes | memoryview, i: int = 0,
                  place: Place | None = None) -> RawBytes | None:
        """The record's verified raw bytes (placed as ``i`` first, with ``place``), or None: then the record is
        deleted (it failed verification) or was not placed."""
        raw = self._decode(tier, key, record, i, place)
        if raw is None:
            tier.delete(key)
            self.on_change(key, self.where(key))
            return None
        self._count_hit(tier.name, len(record))
        return raw

    def _rescan(self, key: BlockKey, i: int = 0, place: Place | None = None) -> Found | None:
        for tier in self.tiers:
            if tier.contains(key):
                record = self._read_one(tier, key, tier.get, True)
                raw = None if record is None else self._verified(tier, key, record, i, place)
                if raw is not None:
                    return raw, tier.name
        return None

    def _promote(self, tier: Tier, key: BlockKey, raw: RawBytes, copy: bool = False) -> None:
        """Copy a lower tier's hit up into the top tier (in the background when a runner is set); ``copy`` when
        ``raw`` is memory its owner reuses once this returns."""
        if self._top != 0:
            return  # the top tier cannot hold a block
        if self.promotion is not None and not self.promotion.admit():
            self.metrics.add(tier.name, "promotions_skipped")
            return
        if copy:
            raw = bytes(raw)

        def promote() -> None:
            if self.tiers[0].contains(key):
                return
            try:
                if self._put_into(0, key, self.tiers[0].codec.encode(key, raw), cascade=False):  # it is below
                    self.metrics.add(tier.name, "promotions")
                    if self.promotion is not None:
                        self.promotion.landed(key)
            except Exception as exc:  # a promotion is an optimisation; never fail a load over it
                self._fail(self.tiers[0], "promote", exc)

        if self.background is None:
            promote()
        else:
            self.background(promote)

    def _get_in_transit(self, key: BlockKey, i: int = 0, place: Place | None = None) -> Found | None:
        """A block being demoted, served from the record in hand (in its source tier's format)."""
        moving = self._transit.get(key)
        if moving is None:
            return None
        tier = self.tiers[moving[0]]
        raw = self._decode(tier, key, moving[1], i, place)
        if raw is None:
            return None
        self._count_hit(tier.name, len(moving[1]))
        self.metrics.add(tier.name, "transit_hits")
        return raw, tier.name

    def _count_hit(self, tier: str, nbytes: int) -> None:
        self.metrics.add(tier, "hits")
        self.metrics.add(tier, "bytes_read", nbytes)

    def where(self, key: BlockKey) -> str | None:
        for tier in self.tiers:
            if tier.contains(key):
                return tier.name
        moving = self._transit.get(key)
        return self.tiers[moving[0]].name if moving is not None else None

    def usage(self) -> dict[str, dict[str, int]]:
        return {t.name: {"blocks": len(t), "used_bytes": t.used_bytes, "capacity": t.capacity} for t in self.tiers}

    def clear(self) -> None:
        """Forget every block at once. Local tiers free their storage in the background (on ``background``,
        or a thread of its own); shared tiers keep their objects, which other instances may use."""
        for tier in self.tiers:
            keys = tier.forget_all()
            for key in keys:
                self.on_change(key, None)
            if keys and not tier.shared:
                job = _discarder(tier, keys)
                if self.background is None:
                    threading.Thread(target=job, name=f"kvtier-clear-{tier.name}", daemon=True).start()
                else:
                    self.background(job)

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

    def _fail(self, tier: Tier, kind: str, exc: BaseException) -> None:
        self.metrics.add(tier.name, "errors")
        if (tier.name, kind) not in self._logged:
            self._logged.add((tier.name, kind))
            log.warning("kvtier tier %s (%s): %s: %s; treated as a miss (further %s errors counted, not logged)",
                        tier.name, tier.kind, type(exc).__name__, exc, kind)
        else:
            log.debug("kvtier tier %s (%s): %s", tier.name, tier.kind, exc)
