"""Fences: the completion of copies issued asynchronously, and a thread that acts on them once they complete.

On CUDA a fence is an event recorded on the copy stream after the copies; on CPU the copies are plain and
complete when issued, so the fence is already done. Callers treat both alike: ``done()`` polls, ``wait()``
blocks the host, ``guard(stream)`` makes a device stream wait for the copies without blocking the host (a no-op
for copies that are already complete). Tests pass their own fence factory to hold copies "in flight".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

log = logging.getLogger("kvtier.transfer")


class Fence(Protocol):
    def done(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool:
        """Block until complete; False when ``timeout`` ran out first."""
        ...

    def guard(self, stream: Any) -> None:
        """Order ``stream`` (a device stream, None on CPU) after the copies."""
        ...


FenceFactory = Callable[[Any], Fence]  # stream the copies were issued on (None on CPU) -> its fence


class DoneFence:
    """Copies that were complete when issued (the CPU build)."""

    def done(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> bool:
        return True

    def guard(self, stream: Any) -> None:
        return None


class CudaFence:
    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.event = torch.cuda.Event(blocking=True)  # a thread waiting in synchronize() sleeps, not spins
        self.event.record(stream)

    def done(self) -> bool:
        return bool(self.event.query())

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is None:
            self.event.synchronize()
            return True
        deadline = time.monotonic() + timeout
        pause = 20e-6
        while not self.event.query():
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        return True

    def guard(self, stream: Any) -> None:
        if stream is not None:
            stream.wait_event(self.event)


def default_fence(stream: Any) -> Fence:
    return CudaFence(stream) if stream is not None else DoneFence()


class FenceWatcher:
    """One daemon thread that runs each watched callback once its fence is done, in completion order (a copy
    that completes early is not held up by an earlier one still in flight). Callbacks must not raise; one
    that does is logged and skipped."""

    POLL_S = 0.0005

    def __init__(self, name: str = "kvtier-copies") -> None:
        self._cond = threading.Condition()
        self._pending: list[tuple[Fence, Callable[[], None]]] = []
        self._running = 0  # callbacks taken off the list and not finished yet
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def watch(self, fence: Fence, callback: Callable[[], None]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("FenceWatcher is closed")
            self._pending.append((fence, callback))
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._pending) + self._running

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every watched callback has run; False when ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending or self._running:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(self.POLL_S * 20 if remaining is None else min(remaining, self.POLL_S * 20))
        return True

    def close(self, timeout: float) -> int:
        """Flush for at most ``timeout`` s, then stop; returns how many callbacks never ran."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            left = len(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        return left

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                ready: list[tuple[Fence, Callable[[], None]]] = []
                waiting: list[tuple[Fence, Callable[[], None]]] = []
                for item in self._pending:
                    (ready if item[0].done() else waiting).append(item)
                self._pending = waiting
                self._running = len(ready)
            for _fence, callback in ready:
                try:
                    callback()
                except Exception:  # a broken callback must not stop the others
                    log.exception("kvtier: a copy-completion callback failed")
            with self._cond:
                self._running = 0
                self._cond.notify_all()
                if not ready:  # copies still running: poll again soon, or at once when another is watched
                    self._cond.wait(self.POLL_S)
