"""AsyncSaves: the worker's save copies in flight, the requests whose blocks they read, and the delayed release
of those blocks.

The protocol with vLLM 0.32 (scheduler half in scheduler.py, worker half here):
1. At the end of a step (wait_for_save) the step's saved blocks are copied out of the KV cache into staging
   slots asynchronously (``issue``): on CUDA a save stream ordered after the forward, one fence per step; the
   forward of the next step never waits for it. Saves that find no free slot are dropped and counted.
2. vLLM frees a request's blocks when it finishes or is preempted, never while it runs (full attention).
   For a finishing request that had saves planned since its blocks were allocated, the scheduler's
   request_finished returns True: vLLM keeps its blocks, and the next step's metadata names the request in
   ``release_after_saves``.
3. ``finished_sending`` (from get_finished) reports such a request once none of its copies is in flight
   (fences polled in the engine thread). Only then does vLLM free, and may reuse, its blocks.
4. Preemption frees blocks without asking. The next step's metadata names the preempted requests and
   ``fence`` (from handle_preemptions, before the forward) makes the compute stream and later loads wait for
   their copies in flight; for attention types that free blocks of running requests (sliding window, local
   chunks) it fences every copy in flight.
5. When a copy is done the watcher thread reorders its slots into block-major records in ordinary memory,
   returns the slots and queues the store (bounded by ``connector.max_pending_save_bytes``).
Host KV caches (the CPU build) skip the staging: ``issue`` copies the blocks straight into records, done when
it returns, so no copy is ever in flight and steps 3-4 have nothing to wait for.
Blocks shared through vLLM's prefix cache are reference-counted by vLLM: a block stays allocated while any
holder has it, a request whose release is delayed here included.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from kvtier.connector.counters import Counters
from kvtier.transfer import Fence, FenceWatcher, KVCopier, Slot

log = logging.getLogger("kvtier.worker")
Then = Callable[[], None]  # runs right after a store (attention scores of the step that saved the blocks)
# queue a store of the records, running ``then`` after it; None when it was dropped (``then`` not run)
StoreFn = Callable[[list[bytes], np.ndarray, "Then | None"], "Future[None] | None"]


@dataclass(eq=False)
class _Copy:
    fence: Fence
    reqs: frozenset[str]
    keys: list[bytes]
    chunks: list[tuple[Slot, int]]
    stored: Future[None]
    then: Then | None = None  # runs after the store, or when the store is dropped
    fenced: bool = False  # the compute stream and the loads already wait for it (later work is ordered after)


class AsyncSaves:
    def __init__(self, copier: KVCopier, watcher: FenceWatcher, store: StoreFn, drop: Callable[[list[bytes]], None],
                 counters: Counters) -> None:
        self.copier = copier
        self.pool = copier.pool
        self.layout = copier.layout
        self._watcher = watcher
        self._store = store
        self._drop = drop
        self._counters = counters
        self._inflight: list[_Copy] = []  # engine thread only
        self._holds: dict[str, int] = {}  # request -> copies in flight that read its blocks
        self._releases: set[str] = set()  # announced by the scheduler, not reported yet

    def issue(self, saves: Sequence[tuple[bytes, int]], owners: Iterable[str],
              then: Then | None = None) -> Future[None] | None:
        """Start copying the blocks of ``saves`` (key, block id) out; the future completes once their store
        has landed or was dropped, ``then`` having run just before. Never waits for the device. None: nothing
        was started (``then`` not run)."""
        if self.copier.direct:  # host KV caches: blocks go straight into records, done on return
            return self._issue_direct(saves, then)
        per_slot = self.pool.chunk_blocks
        slots = self.pool.try_acquire_for_save(-(-len(saves) // per_slot))
        fit = min(len(saves), len(slots) * per_slot)
        if fit < len(saves):
            self._counters.add(staging_dropped_blocks=len(saves) - fit)
            self._drop([key for key, _ in saves[fit:]])
        if not slots:
            return None
        chunks = []
        for k, slot in enumerate(slots):
            part = saves[k * per_slot:min(fit, (k + 1) * per_slot)]
            slot.ids.numpy()[:len(part)] = [block_id for _, block_id in part]
            chunks.append((slot, len(part)))
        keys = [key for key, _ in saves[:fit]]
        try:
            fence = self.copier.save(chunks)
        except Exception as exc:  # a failed copy costs this step's saves, never the engine
            log.warning("kvtier: copying %d blocks out for saving failed: %s", fit, exc)
            self.pool.release(slots)
            self._drop(keys)
            return None
        copy = _Copy(fence, frozenset(owners), keys, chunks, Future(), then)
        self._inflight.append(copy)
        for req in copy.reqs:
            self._holds[req] = self._holds.get(req, 0) + 1
        self._watcher.watch(fence, lambda: self._landed(copy))  # off the engine thread, also when already done
        return copy.stored

    def _issue_direct(self, saves: Sequence[tuple[bytes, int]], then: Then | None) -> Future[None] | None:
        keys = [key for key, _ in saves]
        records = np.empty((len(saves), self.layout.block_bytes), dtype=np.uint8)
        try:
            self.layout.read_blocks([block_id for _, block_id in saves], records)
        except Exception as exc:  # a failed copy costs this step's saves, never the engine
            log.warning("kvtier: copying %d blocks out for saving failed: %s", len(keys), exc)
            self._drop(keys)
            return None
        stored: Future[None] = Future()
        self._hand_over(keys, records, then, stored)
        return stored

    def _landed(self, copy: _Copy) -> None:
        """Once the copy is done: records out of the slots, slots back, store queued."""
        records: np.ndarray | None = np.empty((len(copy.keys), self.layout.block_bytes), dtype=np.uint8)
        try:
            start = 0
            for slot, n in copy.chunks:
                self.layout.unstage(slot.data.numpy(), n, records[start:start + n])  # type: ignore[index]
                start += n
        except Exception as exc:
            log.warning("kvtier: reading %d saved blocks out of staging failed: %s", len(copy.keys), exc)
            records = None
        finally:
            self.pool.release([slot for slot, _ in copy.chunks])
        self._hand_over(copy.keys, records, copy.then, copy.stored)

    def _hand_over(self, keys: list[bytes], records: np.ndarray | None, then: Then | None,
                   stored: Future[None]) -> None:
        """Queue the store of ``records`` (None: the copy failed); ``stored`` completes once it has landed or
        was dropped, ``then`` having run either way."""
        future = self._store(keys, records, then) if records is not None else None
        if records is None:
            self._drop(keys)
        if future is None:
            if then is not None:
                try:
                    then()
                except Exception:
                    log.exception("kvtier: the work after a dropped store failed")
            stored.set_result(None)
        else:
            future.add_done_callback(lambda _f: stored.set_result(None))

    # ---- delayed release --------------------------------------------------------------------------
    def poll(self) -> None:
        """Forget the copies that are done (engine thread)."""
        still: list[_Copy] = []
        for copy in self._inflight:
            if not copy.fence.done():
                still.append(copy)
                continue
            for req in copy.reqs:
                left = self._holds[req] - 1
                if left:
                    self._holds[req] = left
                else:
                    del self._holds[req]
        self._inflight = still

    def finished_sending(self, announced: Iterable[str]) -> set[str]:
        """The announced requests none of whose copies is in flight any more: vLLM may free their blocks."""
        self._releases.update(announced)
        if not self._releases:
            return set()
        self.poll()
        done = {req for req in self._releases if req not in self._holds}
        self._releases -= done
        return done

    def fence(self, preempted: Iterable[str], everything: bool = False) -> int:
        """Order the compute stream and later loads after the copies in flight that read blocks of the
        ``preempted`` requests (all copies when ``everything``); returns how many were fenced."""
        self.poll()
        wanted = set(preempted)
        fenced = 0
        for copy in self._inflight:
            if not copy.fenced and (everything or not wanted.isdisjoint(copy.reqs)):
                self.copier.guard_compute(copy.fence)
                self.copier.guard_loads(copy.fence)
                copy.fenced = True
                fenced += 1
        if fenced:
            self._counters.add(save_fences=fenced)
        return fenced

    def in_flight(self) -> int:
        self.poll()
        return len(self._inflight)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every copy is done and handed to the store queue; False when ``timeout`` ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for copy in list(self._inflight):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not copy.fence.wait(remaining):
                return False
        self.poll()
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self._watcher.flush(remaining)
