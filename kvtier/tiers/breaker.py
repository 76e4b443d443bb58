"""A small circuit breaker shared by the network tiers (S3, Redis).

After a connection failure or a timeout the breaker *opens* at once: every call fails fast with TierError for
a backoff window (1 s, doubling up to 30 s) instead of waiting on timeouts, so a dead or hung server cannot
stall the engine. When the window ends, one probe checks the server: a background save may be that probe
itself (it is off every request's path), while a load never is: it starts the tier's own probe (a cheap call
such as PING) on a background thread and keeps failing fast. The probe's success closes the breaker, its
failure doubles the window. Only connection-level failures and timeouts count; errors the server answered
with (missing key, access denied, out of memory) mean the server is alive.
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
                 clock: Callable[[], float] = time.monotonic, probe: Callable[[], None] | None = None) -> None:
        self.label = label
        self.initial_s = initial_s
        self.max_s = max_s
        self.probe = probe  # a cheap call that raises when the server does not answer
        self._clock = clock
        self._lock = threading.Lock()
        self._backoff = 0.0        # 0 while closed
        self._retry_at = 0.0       # no call reaches the server before this time while open
        self._last_error = ""
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._backoff > 0.0

    def check(self, may_probe: bool = True) -> None:
        """Raise CircuitOpenError while open. When the window has ended, a caller with ``may_probe`` goes
        through as the probe; any other caller starts the background probe and fails fast."""
        if not self._backoff:
            return
        start_probe = False
        with self._lock:
            if not self._backoff:
                return
            now = self._clock()
            if now >= self._retry_at:
                self._retry_at = now + self._backoff  # others keep failing fast while this probe runs
                if may_probe:
                    return
                start_probe = self.probe is not None and not self._probing
                self._probing = self._probing or start_probe
            remaining = max(0.0, self._retry_at - now)
            error = self._last_error
        if start_probe:
            threading.Thread(target=self._run_probe, name=f"kvtier-probe-{self.label}", daemon=True).start()
        raise CircuitOpenError(f"{self.label}: server unreachable, failing fast for {remaining:.1f} s more "
                               f"(last error: {error})")

    def _run_probe(self) -> None:
        try:
            assert self.probe is not None
            self.probe()
        except Exception as exc:  # the probe's own failure is just another failed try
            self.record_failure(f"probe: {type(exc).__name__}: {exc}")
        else:
            self.record_success()
        finally:
            with self._lock:
                self._probing = False

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
