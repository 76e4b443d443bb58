"""SaveQueue: background saves on daemon threads, bounded by the bytes they hold, cancellable at shutdown.

A save holds a host copy of its blocks until it has been stored. ``submit`` refuses a job that would take the
bytes held past ``max_bytes`` (the caller counts it as dropped: a dropped save is only a future miss), so a
slow store (S3 at 1 MB/s under saves at 10 MB/s) cannot grow memory without bound. ``close`` waits at most
its timeout, then cancels what is still queued; threads stuck in a network call are daemons and never hold
up the engine's exit. ``nice`` lowers the threads' scheduling priority (Linux), so they give way to the
engine's own threads; ``idle`` puts them under SCHED_IDLE, so they run only on a CPU nothing else wants.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from kvtier.hostmem import idle_thread_policy, lower_thread_priority

_STOP = object()
log = logging.getLogger(__name__)


class SaveQueue:
    def __init__(self, threads: int, max_bytes: int, name: str = "kvtier-save", nice: int = 0,
                 idle: bool = False) -> None:
        self.max_bytes = max_bytes
        self.nice = nice
        self.idle = idle
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._held = 0
        self._pending: set[Future[Any]] = set()
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    @property
    def held_bytes(self) -> int:
        return self._held

    def submit(self, fn: Callable[[], Any], nbytes: int = 0) -> Future[Any] | None:
        """Queue ``fn``; None (nothing queued) when closed or when its bytes would pass the bound."""
        future: Future[Any] = Future()
        with self._lock:
            if self._closed or (nbytes and self._held + nbytes > self.max_bytes):
                return None
            self._held += nbytes
            self._pending.add(future)
        self._jobs.put((future, fn, nbytes))
        return future

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far has run; False when ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for future in self.pending():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                future.exception(timeout=remaining)
            except TimeoutError:
                return False
            except Exception:  # cancelled
                continue
        return True

    def pending(self) -> list[Future[Any]]:
        with self._lock:
            return list(self._pending)

    def close(self, timeout: float) -> int:
        """Drain for at most ``timeout`` s, then cancel the jobs still queued; returns how many were cancelled."""
        self.drain(timeout)
        with self._lock:
            self._closed = True
            cancelled = sum(1 for f in self._pending if f.cancel())
        for _ in self._threads:
            self._jobs.put(_STOP)
        return cancelled

    def _run(self) -> None:
        if self.nice:
            try:
                lower_thread_priority(self.nice)
            except (AttributeError, OSError) as exc:
                log.warning("kvtier: cannot lower the save threads' priority (connector.save_nice): %s", exc)
        if self.idle:
            try:
                idle_thread_policy()
            except (AttributeError, OSError) as exc:
                log.warning("kvtier: cannot run the save threads under SCHED_IDLE (connector.save_idle): %s", exc)
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            future, fn, nbytes = job
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # reported through the future, never kills the thread
                        future.set_exception(exc)
            finally:
                with self._lock:
                    self._held -= nbytes
                    self._pending.discard(future)
