"""A small circuit breaker shared by the network tiers (S3, Redis).

After a connection failure the breaker *opens*: every call fails fast with TierError for a backoff window
(1 s, doubling up to 30 s) instead of waiting on timeouts, so a dead server cannot stall the engine. When the
window ends, one caller is let through as a probe (the window is re-armed for everyone else meanwhile): its
success closes the breaker, its failure doubles the window. Only connection-level failures count; errors the
server answered with (missing key, access denied, out of memory) mean the server is alive.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kvtier.errors import TierError

log = logging.getLogger(__name__)


class CircuitOpenError(TierError):
    """Raised without touching the network while the breaker is open."""


class CircuitBreaker:
    def __init__(self, label: str, initial_s: float = 1.0, max_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.initial_s = initial_s
        self.max_s = max_s
        self._clock = clock
        self._lock = threading.Lock()
        self._backoff = 0.0        # 0 while closed
        self._retry_at = 0.0       # no call reaches the server before this time while open
        self._last_error = ""

    @property
    def is_open(self) -> bool:
        return self._backoff > 0.0

    def check(self) -> None:
        """Raise CircuitOpenError while the window lasts; let exactly one probe through when it ends."""
        if not self._backoff:
            return
        with self._lock:
            if not self._backoff:
                return
            now = self._clock()
            if now >= self._retry_at:
                self._retry_at = now + self._backoff  # others keep failing fast while this probe runs
                return
            remaining = self._retry_at - now
        raise CircuitOpenError(f"{self.label}: server unreachable, failing fast for {remaining:.1f} s more "
                               f"(last error: {self._last_error})")

    def record_success(self) -> None:
        if not self._backoff:
            return
        with self._lock:
            if self._backoff:
                log.warning("%s: server reachable again, resuming", self.label)
            self._backoff = 0.0
            self._retry_at = 0.0
            self._last_error = ""

    def record_failure(self, error: str) -> None:
        with self._lock:
            first = not self._backoff
            self._backoff = self.initial_s if first else min(self._backoff * 2.0, self.max_s)
            self._retry_at = self._clock() + self._backoff
            self._last_error = error
        if first:  # logged once per outage, not once per request
            log.warning("%s: server unreachable (%s); failing fast, next try in %.0f s", self.label, error,
                        self.initial_s)
