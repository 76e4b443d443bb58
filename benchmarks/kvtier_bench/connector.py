"""BenchKVTierConnector: KVTierConnector that also writes the worker's counters to a file, for benchmarks.

The benchmark drives engines in other processes and reads kvtier's cumulative counters (per-tier hits, bytes,
usage) between timed rounds. The runtime exposes them through vLLM's connector stats and Prometheus; this
subclass, loaded by ``kvtier_bench.configs.transfer_config`` (``kv_connector_module_path="kvtier_bench.connector"``),
additionally writes ``KVTierConnector.snapshot()`` as JSON to ``$KVTIER_STATS_FILE`` (atomically) whenever vLLM
collects connector stats, and at shutdown.

``$KVBENCH_JITTER_MS`` (a stress test for reproducibility): every store batch of the worker first sleeps a
random 0..N ms and every tier read 0..N/20 ms (from the OS's entropy, different on every run), the way a loaded
machine delays the transfer threads. A benchmark whose hit rates change under it depends on thread timing.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

from kvtier.connector.connector import KVTierConnector

log = logging.getLogger("kvtier_bench")
STATS_ENV = "KVTIER_STATS_FILE"
JITTER_ENV = "KVBENCH_JITTER_MS"  # not KVTIER_*: those are kvtier config overrides


def _jittered(fn: Callable[..., Any], max_s: float, rng: random.Random) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        time.sleep(rng.random() * max_s)
        return fn(*args, **kwargs)

    return call


class BenchKVTierConnector(KVTierConnector):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stats_file = os.environ.get(STATS_ENV)
        jitter_ms = float(os.environ.get(JITTER_ENV) or 0)
        if jitter_ms > 0 and self._worker is not None:
            rng = random.Random(os.urandom(16))
            stack = self._worker.stack
            stack.put_many = _jittered(stack.put_many, jitter_ms / 1e3, rng)  # type: ignore[method-assign]
            for tier in stack.tiers:
                tier.get = _jittered(tier.get, jitter_ms / 2e4, rng)  # type: ignore[method-assign]
            log.warning("kvtier_bench: random delays of up to %.1f ms in stores and reads", jitter_ms)

    def get_kv_connector_stats(self) -> Any:
        stats = super().get_kv_connector_stats()
        if stats is not None or (self._stats_file and not os.path.exists(self._stats_file)):
            self.write_stats_file()
        return stats

    def shutdown(self) -> None:
        super().shutdown()
        self.write_stats_file()

    def write_stats_file(self) -> None:
        data = self.snapshot()
        if not self._stats_file or data is None:
            return
        tmp = f"{self._stats_file}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self._stats_file)
        except OSError as exc:
            log.warning("kvtier_bench: cannot write stats to %s: %s", self._stats_file, exc)
            self._stats_file = None

