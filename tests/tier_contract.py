"""The Tier contract (kvtier/tiers/base.py), run against every tier implementation.

Use it by subclassing ``TierContract`` in a test module (``from tier_contract import TierContract``: pytest puts
``tests/`` on ``sys.path``) and providing a ``tier`` fixture that yields a fresh, empty tier of about
``CAPACITY`` bytes with an LRU policy, and closes it afterwards. Nothing here assumes a filesystem, a server or
a page size: a tier may round its usage up (a paged tier counts whole pages in ``used_bytes``), so assertions
only rely on ``used_bytes <= capacity`` and on what ``get`` returns.

Subclasses for slow backends may shrink ``RECORD_SIZE`` or ``THREAD_ROUNDS``.
"""

from __future__ import annotations

import hashlib
import random
import threading

import pytest

from kvtier.codecs import BlockCodec
from kvtier.config import CodecConfig
from kvtier.errors import TierFullError
from kvtier.keys import BlockKey
from kvtier.tiers.base import Tier

CAPACITY = 1024 * 1024


def make_key(i: int | str) -> BlockKey:
    return hashlib.blake2b(str(i).encode(), digest_size=16).digest()


def make_record(key: BlockKey, raw_size: int, seed: int = 0) -> bytes:
    """A real block record (none codec) over pseudo-random raw bytes."""
    raw = random.Random(key + seed.to_bytes(4, "little")).randbytes(raw_size)
    return BlockCodec(CodecConfig()).encode(key, raw)


class TierContract:
    RECORD_SIZE = 60 * 1024  # about 16 records fill the ~1 MiB tier
    THREADS = 4
    THREAD_ROUNDS = 40

    # ---- helpers ----------------------------------------------------------------------------------------
    def fill(self, tier: Tier, count: int, prefix: str = "k", size: int | None = None) -> dict[BlockKey, bytes]:
        stored: dict[BlockKey, bytes] = {}
        for i in range(count):
            key = make_key(f"{prefix}{i}")
            stored[key] = make_record(key, size or self.RECORD_SIZE)
            tier.put(key, stored[key])
            assert tier.used_bytes <= tier.capacity
        return stored

    def fits(self, tier: Tier) -> int:
        """How many RECORD_SIZE records surely fit together (half the capacity: slack for page rounding)."""
        return max(1, tier.capacity // (self.RECORD_SIZE * 2))

    # ---- basic operations -------------------------------------------------------------------------------
    def test_put_get_roundtrip_exact_bytes(self, tier: Tier) -> None:
        stored = self.fill(tier, self.fits(tier))
        for key, record in stored.items():
            assert tier.get(key) == record

    def test_odd_sizes_roundtrip(self, tier: Tier) -> None:
        for i, raw_size in enumerate((0, 1, 4095, 4096, 4097, self.RECORD_SIZE + 3)):
            key = make_key(f"odd{i}")
            record = make_record(key, raw_size)
            tier.put(key, record)
            assert tier.get(key) == record

    def test_get_absent_is_none(self, tier: Tier) -> None:
        assert tier.get(make_key("never-stored")) is None
        assert not tier.contains(make_key("never-stored"))
        assert tier.delete(make_key("never-stored")) is False

    def test_contains_keys_len(self, tier: Tier) -> None:
        stored = self.fill(tier, 3)
        assert sorted(tier.keys()) == sorted(stored)
        assert len(tier) == 3
        assert all(tier.contains(k) for k in stored)

    def test_replace(self, tier: Tier) -> None:
        key = make_key("r")
        tier.put(key, make_record(key, self.RECORD_SIZE, seed=1))
        used_one = tier.used_bytes
        second = make_record(key, self.RECORD_SIZE, seed=2)
        assert tier.put(key, second) == []
        assert tier.get(key) == second
        assert len(tier) == 1 and tier.used_bytes == used_one

    def test_replace_when_full_stays_within_capacity(self, tier: Tier) -> None:
        # The key being replaced is the least recently used one: it must not become its own victim.
        stored = self.fill(tier, 2 * self.fits(tier) + 4)
        oldest = next(k for k in stored if tier.contains(k))
        bigger = make_record(oldest, 2 * self.RECORD_SIZE, seed=9)
        victims = tier.put(oldest, bigger)
        assert oldest not in [k for k, _ in victims]
        assert tier.get(oldest) == bigger
        assert tier.used_bytes <= tier.capacity

    def test_delete(self, tier: Tier) -> None:
        stored = self.fill(tier, 2)
        gone, kept = list(stored)
        assert tier.delete(gone) is True
        assert tier.delete(gone) is False
        assert tier.get(gone) is None and not tier.contains(gone)
        assert tier.get(kept) == stored[kept]
        assert tier.keys() == [kept]

    # ---- capacity and eviction --------------------------------------------------------------------------
    def test_used_never_exceeds_capacity_and_victims_carry_records(self, tier: Tier) -> None:
        stored: dict[BlockKey, bytes] = {}
        evicted: dict[BlockKey, bytes | None] = {}
        rng = random.Random(7)
        for i in range(6 * self.fits(tier) + 10):
            key = make_key(f"e{i}")
            stored[key] = make_record(key, rng.randint(1, 2 * self.RECORD_SIZE))
            for vkey, vrecord in tier.put(key, stored[key]):
                evicted[vkey] = vrecord
            assert tier.used_bytes <= tier.capacity
        assert evicted, "writing far beyond capacity must evict"
        for vkey, vrecord in evicted.items():
            assert vrecord == stored[vkey]  # the victim comes back with its exact record, for demotion
            assert not tier.contains(vkey) and tier.get(vkey) is None
        assert set(tier.keys()) | set(evicted) == set(stored)
        assert not set(tier.keys()) & set(evicted)

    def test_lru_order(self, tier: Tier) -> None:
        stored = self.fill(tier, self.fits(tier))
        first, second = list(stored)[:2]
        assert tier.get(first) == stored[first]  # touch: `second` is now the least recently used
        victims: list[BlockKey] = []
        i = 0
        while not victims:
            key = make_key(f"more{i}")
            victims = [k for k, _ in tier.put(key, make_record(key, self.RECORD_SIZE))]
            i += 1
        assert victims[0] == second
        assert tier.contains(first)

    def test_record_larger_than_capacity(self, tier: Tier) -> None:
        stored = self.fill(tier, 3)
        key = make_key("huge")
        with pytest.raises(TierFullError):
            tier.put(key, make_record(key, tier.capacity + 1))
        assert not tier.contains(key)
        for k, record in stored.items():  # nothing lost
            assert tier.get(k) == record

    def test_protected_keys_are_not_evicted(self, tier: Tier) -> None:
        stored = self.fill(tier, 2)
        keep = next(iter(stored))
        tier.policy.protect([keep])
        self.fill(tier, 4 * self.fits(tier) + 4, prefix="p")
        assert tier.get(keep) == stored[keep]
        tier.policy.unprotect([keep])

    def test_full_of_protected_keys_refuses_and_loses_nothing(self, tier: Tier) -> None:
        stored: dict[BlockKey, bytes] = {}
        for i in range(10_000):  # protect every key until the tier cannot take another record
            key = make_key(f"all{i}")
            record = make_record(key, self.RECORD_SIZE)
            try:
                victims = tier.put(key, record)
            except TierFullError:
                break
            assert victims == []
            stored[key] = record
            tier.policy.protect([key])
        else:
            pytest.fail("a bounded tier never refused a record")
        assert stored and not tier.contains(key)
        for k, rec in stored.items():
            assert tier.get(k) == rec
        assert tier.used_bytes <= tier.capacity

    # ---- concurrency ------------------------------------------------------------------------------------
    def test_threads_smoke(self, tier: Tier) -> None:
        errors: list[BaseException] = []

        def worker(t: int) -> None:
            try:
                for r in range(self.THREAD_ROUNDS):
                    key = make_key(f"t{t}-{r % 7}")
                    record = make_record(key, self.RECORD_SIZE // 4, seed=r)
                    tier.put(key, record)
                    got = tier.get(key)
                    # Keys are per thread: another thread may evict this one (None) but never rewrite it.
                    assert got is None or got == record
                    assert tier.used_bytes <= tier.capacity
                    if r % 5 == 4:
                        tier.delete(make_key(f"t{t}-{(r + 3) % 7}"))
            except BaseException as exc:  # noqa: BLE001 - surfaced to the main thread below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(self.THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        assert not errors, errors[0]
        assert tier.used_bytes <= tier.capacity
        held = tier.keys()
        assert all(tier.get(key) is not None for key in held)
