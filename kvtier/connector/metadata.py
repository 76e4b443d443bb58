"""What the scheduler-side connector sends the worker each step, what the worker sends back, and stats.

The classes derive from vLLM's when vLLM is installed. Without it (the GPU check, scripts/gpu-check.sh, drives
the worker side on machines that have PyTorch but no vLLM) they derive from plain stand-ins of the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
except ImportError:  # no vLLM here: only the worker side runs, driven directly
    class KVConnectorMetadata:  # type: ignore[no-redef]
        pass

    class KVConnectorWorkerMetadata:  # type: ignore[no-redef]
        def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
            raise NotImplementedError

    @dataclass
    class KVConnectorStats:  # type: ignore[no-redef]
        data: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadSpec:
    req_id: str
    keys: list[bytes]
    block_ids: list[int]
    is_async: bool = False


@dataclass
class KVTierMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[tuple[bytes, int]] = field(default_factory=list)  # (key, block id)
    clear_store: bool = False
    # For attention-aware policies (kvtier.attention): keys of the first block of a sequence saved this step
    # (attention sinks) and (child, parent) prefix links of the blocks saved this step.
    sinks: list[bytes] = field(default_factory=list)
    links: list[tuple[bytes, bytes]] = field(default_factory=list)
    # Delayed block release (kvtier/connector/saving.py): the requests that own this step's saves, the requests
    # whose blocks vLLM keeps until the worker reports them in finished_sending (request_finished returned
    # True), and the requests preempted since the last step (their freed blocks may be rewritten this step).
    save_reqs: list[str] = field(default_factory=list)
    release_after_saves: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    # Nothing was scheduled this step (every running request waits, e.g. for its async load): vLLM will step
    # again at once, so the worker may block briefly in get_finished instead of letting the engine spin.
    idle: bool = False


@dataclass
class KVTierWorkerMeta(KVConnectorWorkerMetadata):
    """Placement changes since the last step: (key, tier name) for stored/moved, (key, None) for gone."""

    events: list[tuple[bytes, str | None]] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, KVTierWorkerMeta):
            return KVTierWorkerMeta(self.events + other.events)
        return self


# Stats keys summed across workers and intervals; per-tier counters are "<tier>.<counter>".
@dataclass
class KVTierStats(KVConnectorStats):
    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            if isinstance(value, int | float):
                self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {}
        for key in sorted(self.data):
            value = self.data[key]
            if value:
                out[key] = round(value, 4) if isinstance(value, float) else value
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


def stats_delta(now: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    return {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}
