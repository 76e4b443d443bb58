"""BenchKVTierConnector: KVTierConnector that also writes the worker's counters to a file, for benchmarks.

The benchmark drives engines in other processes and reads kvtier's cumulative counters (per-tier hits, bytes,
usage) between timed rounds. The runtime exposes them through vLLM's connector stats and Prometheus; this
subclass, loaded by ``kvtier_bench.configs.transfer_config`` (``kv_connector_module_path="kvtier_bench.connector"``),
additionally writes ``KVTierConnector.snapshot()`` as JSON to ``$KVTIER_STATS_FILE`` (atomically) whenever vLLM
collects connector stats, and at shutdown.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from kvtier.connector.connector import KVTierConnector

log = logging.getLogger("kvtier_bench")
STATS_ENV = "KVTIER_STATS_FILE"


class BenchKVTierConnector(KVTierConnector):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stats_file = os.environ.get(STATS_ENV)

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

