"""DramTier: records in one host-memory pool (pinned when it helps), allocated once and split into pages.

The pool is a single torch uint8 tensor created at construction; a record occupies a list of pages taken from
a free list (not necessarily contiguous), so the hot path never allocates pool memory. Pages are freed back
in reverse order, so a freed record's pages are handed out again in their original (often contiguous) order.

Accounting: ``capacity`` is ``num_pages * page_size`` and every record counts as its page-rounded size (the
``_footprint`` hook), in ``used_bytes`` and for the policy, so evicting ``n`` bytes frees ``n / page_size`` pages
and a write always finds its pages free. ``record_bytes`` gives the exact bytes held. Note that a record is a
56-byte header plus the payload, so a raw block of exactly k pages takes k + 1 pages: choose ``page_size``
well below the block size to keep that waste small.

Page faults: a pinned pool is faulted in when it is allocated; an ordinary one (the CPU build) is faulted in by a
background thread at the lowest priority (``prefault``, madvise MADV_POPULATE_WRITE, which never changes what a
page holds), so the first saves into each page cost a copy, not a fault per 4 KiB (a 24 MiB put: 12.0 ms into
fresh pages, 2.7 ms into faulted-in ones). The pool's memory is then committed from the start, as a pinned
pool's is.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Literal

import torch

from kvtier.codecs import BlockCodec
from kvtier.errors import ConfigError, TierError
from kvtier.hostmem import PREFAULT_THREAD, lower_thread_priority, populate
from kvtier.keys import BlockKey
from kvtier.policies.base import EvictionPolicy
from kvtier.tiers.base import Tier
from kvtier.units import Size

log = logging.getLogger(__name__)


MIN_PAGE_SIZE = 512
MAX_PAGES = 1 << 26  # the free list holds one entry per page


@dataclass(frozen=True)
class DramOptions:
    pin_memory: Literal["auto", "always", "never"] = "auto"
    page_size: Size = Size(64 * 1024)
    prefault: bool = True

    def __post_init__(self) -> None:
        if self.page_size < MIN_PAGE_SIZE:
            raise ConfigError(f"page_size: at least {MIN_PAGE_SIZE} bytes (a block takes whole pages), "
                              f"got {self.page_size}")


def _want_pinned(mode: str) -> bool:
    if mode == "always":
        return True
    return mode == "auto" and torch.cuda.is_available()


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """Coalesce page numbers into (first_page, count) runs of consecutive pages."""
    runs: list[tuple[int, int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


class DramTier(Tier):
    kind = "dram"
    Options = DramOptions
    hit_source = "host"
    in_memory = True

    @classmethod
    def check_config(cls, capacity: int, options: DramOptions) -> None:
        pages = capacity // options.page_size
        if pages < 1:
            raise ConfigError(f"capacity: {capacity} bytes is less than one page ({options.page_size} bytes); a DRAM "
                              "tier must be bounded")
        if pages > MAX_PAGES:
            raise ConfigError(f"capacity: {capacity} bytes makes {pages} pages of {options.page_size} bytes (at most "
                              f"{MAX_PAGES}); raise page_size")

    def __init__(self, name: str, capacity: int, codec: BlockCodec, policy: EvictionPolicy,
                 options: DramOptions) -> None:
        page_size = int(options.page_size)
        if page_size <= 0:
            raise TierError(f"tier {name}: page_size must be positive, got {page_size}")
        num_pages = capacity // page_size
        if num_pages <= 0:
            raise TierError(f"tier {name}: capacity {capacity} is smaller than one page ({page_size} bytes); "
                            "a DRAM tier must be bounded")
        super().__init__(name, num_pages * page_size, codec, policy)
        self.page_size = page_size
        self.num_pages = num_pages
        self.pinned = _want_pinned(options.pin_memory)
        try:
            self._pool: torch.Tensor | None = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=self.pinned)
        except RuntimeError as exc:
            raise TierError(f"tier {name}: cannot allocate {self.capacity} bytes of "
                            f"{'pinned ' if self.pinned else ''}host memory (pin_memory={options.pin_memory!r}; "
                            f"'auto' pins only where CUDA is available): {exc}") from exc
        self._mem = self._pool.numpy().data.cast("B")
        self._stop_prefault = threading.Event()
        self._prefaulter: threading.Thread | None = None
        if options.prefault and not self.pinned:  # a pinned pool is faulted in already
            self._prefaulter = threading.Thread(target=self._prefault, args=(self._pool.data_ptr(),),
                                                name=f"{PREFAULT_THREAD}-{name}", daemon=True)
            self._prefaulter.start()
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self._pages: dict[BlockKey, tuple[list[int], int]] = {}  # key -> (pages, exact length)
        self._record_bytes = 0

    def _prefault(self, address: int) -> None:
        try:
            lower_thread_priority(19)  # only idle CPU: the engine's threads always go first
        except (AttributeError, OSError):
            pass
        if populate(address, self.capacity, stop=self._stop_prefault):
            log.debug("kvtier: tier %s: %d bytes of pool faulted in", self.name, self.capacity)

    # ---- accounting -------------------------------------------------------------------------------------
    def _footprint(self, size: int) -> int:
        """A record takes whole pages: the base class and the policy count page-rounded bytes."""
        return self.pages_for(size) * self.page_size

    def pages_for(self, size: int) -> int:
        return max(1, -(-size // self.page_size))

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def record_bytes(self) -> int:
        """Exact bytes of the records held; ``used_bytes`` counts the whole pages they occupy."""
        return self._record_bytes

    # ---- storage primitives -----------------------------------------------------------------------------
    def _write(self, key: BlockKey, record: bytes) -> None:
        self._check_open()
        self._release(key)  # a memcpy cannot fail half-way, so the old pages can go first
        want = self.pages_for(len(record))
        if want > len(self._free):  # cannot happen: the base class evicted page-rounded sizes first
            raise TierError(f"tier {self.name}: page accounting broken ({want} pages wanted, "
                            f"{len(self._free)} free)")
        pages = [self._free.pop() for _ in range(want)]
        src = memoryview(record).cast("B")
        done = 0
        for first, count in _runs(pages):
            start = first * self.page_size
            n = min(count * self.page_size, len(src) - done)
            self._mem[start:start + n] = src[done:done + n]
            done += n
        self._pages[key] = (pages, len(src))
        self._record_bytes += len(src)

    def _read(self, key: BlockKey) -> bytes | None:
        entry = self._pages.get(key)
        if entry is None or self._pool is None:
            return None
        pages, length = entry
        parts: list[memoryview] = []
        left = length
        for first, count in _runs(pages):
            start = first * self.page_size
            n = min(count * self.page_size, left)
            parts.append(self._mem[start:start + n])
            left -= n
        return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)

    def view(self, key: BlockKey, touch: bool = True) -> bytes | memoryview | None:
        """A record in consecutive pages is handed out as a view of the pool (no copy); its pages may be reused
        by a later write, which the caller's checksum of what it copied out catches."""
        with self._lock:
            entry = self._pages.get(key)
            if entry is None or self._pool is None or key not in self._sizes:
                return None
            if touch:
                self.policy.on_access(key)
            pages, length = entry
            runs = _runs(pages)
            if len(runs) > 1:
                return self._read(key)
            start = runs[0][0] * self.page_size
            return self._mem[start:start + length]

    def _discard(self, key: BlockKey) -> None:
        self._release(key)

    def _release(self, key: BlockKey) -> None:
        entry = self._pages.pop(key, None)
        if entry is not None:
            self._free.extend(reversed(entry[0]))
            self._record_bytes -= entry[1]

    def _forgotten_all(self) -> None:
        self._pages.clear()
        self._free = list(range(self.num_pages - 1, -1, -1))
        self._record_bytes = 0

    def _check_open(self) -> None:
        if self._pool is None:
            raise TierError(f"tier {self.name}: used after close()")

    def close(self) -> None:
        self._stop_prefault.set()
        if self._prefaulter is not None:
            self._prefaulter.join()  # at most one chunk (64 MiB) still being faulted in
        with self._lock:
            self._pages.clear()
            self._sizes.clear()
            self._used = 0
            self._record_bytes = 0
            self._free = list(range(self.num_pages - 1, -1, -1))
            try:
                self._mem.release()
            except BufferError:  # a load still holds a view: the pool goes when the last view does
                pass
            self._pool = None
