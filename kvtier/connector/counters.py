"""The worker's own counters (blocks and bytes loaded and saved, failures, times), their per-step deltas for
vLLM's connector stats, and a periodic summary line in the log."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kvtier.connector.metadata import stats_delta
from kvtier.units import format_size

log = logging.getLogger("kvtier.worker")


class Counters:
    def __init__(self, sources: Callable[[], dict[str, Any]], log_interval_s: float) -> None:
        """``sources`` adds what others count: {"counters": {...}, "tiers": {...}, "usage": {...}}."""
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()
        self._sources = sources
        self._reported: dict[str, float] = {}
        self._interval = log_interval_s
        self._last_log = time.monotonic()

    def add(self, **values: float) -> None:
        with self._lock:
            for name, value in values.items():
                self._values[name] = self._values.get(name, 0) + value

    def values(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)

    def snapshot(self) -> dict[str, Any]:
        """Cumulative: the connector's counters (and attention capture's), per-tier counters, tier usage."""
        extra = self._sources()
        return {"counters": {**self.values(), **extra.get("counters", {})}, "tiers": extra.get("tiers", {}),
                "usage": extra.get("usage", {})}

    def delta(self) -> dict[str, Any] | None:
        """What changed since the last call, flat (``<tier>.<counter>`` for tier counters), or None."""
        snap = self.snapshot()
        self._maybe_log(snap)
        now = dict(snap["counters"])
        for tier, counters in snap["tiers"].items():
            for name, value in counters.items():
                now[f"{tier}.{name}"] = value
        delta = stats_delta(now, self._reported)
        self._reported = now
        return delta or None

    def _maybe_log(self, snap: dict[str, Any]) -> None:
        """One INFO line every ``metrics.log_interval_s`` (0 = never): what was loaded and saved, tier use."""
        now = time.monotonic()
        if self._interval <= 0 or now - self._last_log < self._interval:
            return
        self._last_log = now
        c = snap["counters"]
        tiers = ", ".join(f"{name} {format_size(u['used_bytes'])}/{format_size(u['capacity'])} ({u['blocks']} blocks)"
                          for name, u in snap["usage"].items())
        log.info("kvtier: loaded %d blocks (%d failed), saved %d (%d failed, %d dropped); %s",
                 c.get("loaded_blocks", 0), c.get("load_failed_blocks", 0), c.get("saved_blocks", 0),
                 c.get("save_failed_blocks", 0), c.get("save_dropped_blocks", 0), tiers)
