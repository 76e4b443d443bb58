"""KVTierConnector: vLLM's KV-connector interface, dispatching to the scheduler or worker side by role.

Enable with ``--kv-transfer-config '{"kv_connector":"KVTierConnector","kv_role":"kv_both",
"kv_connector_extra_config":{"config":"configs/default.yaml"}}'``. The extra config may instead hold the
config inline (``{"tiers": [...]}``); with neither, ``$KVTIER_CONFIG`` or the embedded default is used.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvtier.config import KVTierConfig, default_config
from kvtier.connector.fingerprint import fingerprint_from_vllm
from kvtier.connector.metadata import KVTierMetadata, KVTierStats
from kvtier.connector.placement import StartupPlacement
from kvtier.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

from kvtier.logs import setup_logging

log = logging.getLogger("kvtier")


def _parallel_rank(world: int) -> int:
    """This worker's tensor-parallel rank: it stores its shard of each block under its own keys."""
    if world == 1:
        return 0
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return int(get_tensor_model_parallel_rank())


def _host_kv(vllm_config: VllmConfig) -> bool:
    """KV caches in host memory (the CPU build): the workers copy blocks out without streams, done on return."""
    return str(getattr(vllm_config.device_config, "device_type", "")) == "cpu"


def frees_running_blocks(kv_cache_config: KVCacheConfig | None) -> bool:
    """Whether vLLM may free blocks of a running request (sliding-window, chunked-local, gapped attention...):
    then every step is ordered after the save copies in flight. Only plain full attention never does."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
    return any(type(group.kv_cache_spec) not in (FullAttentionSpec, MLAAttentionSpec) for group in groups)


def load_config(extra: dict[str, Any] | None) -> KVTierConfig:
    extra = dict(extra or {})
    path = extra.pop("config", None) or os.environ.get("KVTIER_CONFIG")
    if path:
        return KVTierConfig.from_yaml(path)
    if "tiers" in extra:
        return KVTierConfig.from_dict(extra, source="kv_connector_extra_config")
    if extra:
        raise ConfigError(f"kv_connector_extra_config: unknown keys {sorted(extra)}; use 'config' (a YAML path) "
                          "or an inline config with 'tiers'")
    return default_config()


class KVTierConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        setup_logging()  # here, not at import: importing kvtier must not reconfigure logging
        transfer = vllm_config.kv_transfer_config
        self.cfg = load_config(transfer.kv_connector_extra_config if transfer else None)
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size > 1:
            raise ConfigError(f"KVTierConnector: pipeline_parallel_size={parallel.pipeline_parallel_size} is not "
                              "supported: each stage would store a part of every block, which kvtier has not been "
                              "verified to do (vLLM 0.32's CPU build fails PP itself); use tensor_parallel_size")
        world = int(parallel.tensor_parallel_size)
        self.block_size = int(vllm_config.cache_config.block_size)
        self._scheduler = None
        self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            from kvtier.connector.scheduler import SchedulerSide

            if transfer is not None and transfer.kv_load_failure_policy != "recompute":
                # A block that fails verification must be recomputed, never fail the request.
                object.__setattr__(transfer, "kv_load_failure_policy", "recompute")
            self._scheduler = SchedulerSide(self.cfg, fingerprint_from_vllm(vllm_config, kv_cache_config),
                                            self.block_size, world, copies_end_in_step=_host_kv(vllm_config))
        else:
            from kvtier.connector.worker import WorkerSide

            num_blocks = kv_cache_config.num_blocks if kv_cache_config is not None else None
            self._worker = WorkerSide(self.cfg, num_blocks, rank=_parallel_rank(world), world=world,
                                      fence_every_step=frees_running_blocks(kv_cache_config))

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return load_config(extra_config).connector.layerwise_load  # per-layer waits must run between pieces

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is only a future miss

    # ---- worker side -----------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)
        self._worker.attach_attention(self._vllm_config.compilation_config.static_forward_context, self.block_size)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVTierMetadata)
        self._worker.start_load_kv(meta)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        assert self._worker is not None
        if isinstance(kv_connector_metadata, KVTierMetadata):
            self._worker.handle_preemptions(kv_connector_metadata)

    def wait_for_layer_load(self, layer_name: str) -> None:
        assert self._worker is not None
        self._worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        return None  # whole blocks are copied out once per step in wait_for_save

    def wait_for_save(self) -> None:
        assert self._worker is not None
        if self.has_connector_metadata():
            meta = self._get_connector_metadata()
            assert isinstance(meta, KVTierMetadata)
            self._worker.wait_for_save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        return self._worker.get_finished(finished_req_ids, meta if isinstance(meta, KVTierMetadata) else None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def get_handshake_metadata(self) -> StartupPlacement | None:
        """What this worker's persistent tiers held at start-up, for the scheduler (vLLM's handshake channel)."""
        return self._worker.startup_placement() if self._worker is not None else None

    def set_xfer_handshake_metadata_pp_aware(self, metadata: dict[tuple[int, int], Any]) -> None:
        if self._scheduler is not None:
            self._scheduler.learn_startup(m for m in metadata.values() if isinstance(m, StartupPlacement))

    def build_connector_worker_meta(self) -> Any:
        return self._worker.build_worker_meta() if self._worker is not None else None

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for this worker's saves in flight (copies, stores, promotions); False when ``timeout`` ran out
        first. True at once on the scheduler side, which saves nothing."""
        return self._worker.drain(timeout) if self._worker is not None else True

    def snapshot(self) -> dict[str, Any] | None:
        """The worker's cumulative counters and tier usage (None on the scheduler side)."""
        return self._worker.snapshot() if self._worker is not None else None

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        data = self._worker.stats_data() if self._worker is not None else None
        return KVTierStats(data=data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KVTierStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[type, type], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> Any:
        from kvtier.prom import build_prom_metrics

        return build_prom_metrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()

    # ---- scheduler side --------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[Any, int]:
        from vllm.v1.metrics.cache_hit_source import CacheHitSource

        if num_external_tokens == 0 or self._scheduler is None:
            return {}
        kinds = {"host": CacheHitSource.HOST, "disk": CacheHitSource.DISK}
        out: dict[Any, int] = {}
        for tier, tokens in self._scheduler.hit_sources(request).items():
            source = kinds.get(self._scheduler.tier_sources.get(tier, ""), CacheHitSource.EXTERNAL_UNSPECIFIED)
            out[source] = out.get(source, 0) + tokens
        if sum(out.values()) != num_external_tokens:
            return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
        return out

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self._scheduler is not None:
            self._scheduler.update_connector_output(connector_output.kv_connector_worker_meta)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # True: vLLM keeps the blocks until the worker reports the request in finished_sending, once the
        # copies out of them are done (kvtier/connector/saving.py).
        delay = self._scheduler.request_finished(request) if self._scheduler is not None else False
        return delay, None

    def reset_cache(self) -> bool | None:
        return self._scheduler.reset_cache() if self._scheduler is not None else None
