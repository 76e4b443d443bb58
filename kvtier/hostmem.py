"""Keep freed host memory in the process (glibc's allocator), so block-sized buffers are not page-faulted in again.

Every load and save allocates buffers of a block's size (a record read from a tier, its decoded bytes, the
records of a save). With glibc's defaults such buffers are fresh mmaps, or heap memory trimmed back to the OS
as soon as it is freed, and every use pays a page fault per 4 KiB page: measured on a 2-core VM, reading 16
blocks of 1 MiB out of the DRAM tier took 10 ms with the defaults and 2.2 ms with memory kept (a ZSTD-coded
disk hit 16.9 -> 9.3 ms). ``keep_freed_memory`` makes allocations below 32 MiB come from the heap and keeps up
to ``trim_bytes`` of freed heap memory, bounding what the process holds beyond what it uses. It is process-wide:
the worker calls it once, when ``connector.keep_freed_memory`` is not 0.

``populate`` faults a range in ahead of use (the DRAM tier's pool, in a background thread) and
``lower_thread_priority`` makes such background work give way to the engine's threads.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import sys
import threading

log = logging.getLogger("kvtier.worker")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses larger values on 64-bit
TRIM_MAX = 2**31 - 1  # mallopt takes an int
MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in, writable, without changing what they hold
PREFAULT_THREAD = "kvtier-prefault"  # name prefix of threads calling populate (benchmarks wait for them)


def keep_freed_memory(trim_bytes: int) -> bool:
    """Set glibc's mmap and trim thresholds; False (nothing changed) on other C libraries or platforms."""
    if trim_bytes <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    trim = min(trim_bytes, TRIM_MAX)
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, trim) == 1
    if not ok:
        log.info("kvtier: the C library refused the allocator settings; host buffers are page-faulted as usual")
    return ok


def glibc_tunables(trim_bytes: int) -> str:
    """The ``GLIBC_TUNABLES`` value that gives a process, from its start, the settings ``keep_freed_memory``
    applies (benchmarks run plain vLLM with it, so a comparison measures kvtier's connector, not the allocator)."""
    return (f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD_MAX}:"
            f"glibc.malloc.trim_threshold={min(trim_bytes, TRIM_MAX)}")


def lower_thread_priority(nice: int) -> None:
    """Add ``nice`` to the calling thread's niceness (Linux: a thread is a task, so only this thread changes).
    Raises OSError (or AttributeError off Unix) when the platform refuses."""
    tid = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)


def idle_thread_policy() -> None:
    """Put the calling thread under SCHED_IDLE (Linux; only this thread): it runs when a CPU has nothing else to
    run, and any other thread preempts it at once. Raises OSError (or AttributeError off Linux) when refused."""
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def populate(address: int, length: int, chunk: int = 64 << 20, stop: threading.Event | None = None) -> bool:
    """Fault in the whole pages of ``[address, address + length)`` for writing, ``chunk`` bytes per call, without
    changing their contents (``madvise(MADV_POPULATE_WRITE)``), so the first writes there cost a copy, not a page
    fault per 4 KiB. Safe beside threads writing the same memory. Stops early when ``stop`` is set. False where
    the platform or kernel (before 5.14) cannot, or the range is not mapped: nothing else happens then."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    page = mmap.PAGESIZE
    start = -(-address // page) * page
    end = (address + length) // page * page
    chunk = max(page, chunk // page * page)
    while start < end:
        if stop is not None and stop.is_set():
            return False
        n = min(chunk, end - start)
        if madvise(start, n, MADV_POPULATE_WRITE) != 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            log.debug("kvtier: madvise(MADV_POPULATE_WRITE) failed: %s", os.strerror(err))
            return False
        start += n
    return True
