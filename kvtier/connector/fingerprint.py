"""The model fingerprint that namespaces block keys, derived from vLLM's config (scheduler side)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvtier.keys import ModelFingerprint

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


def fingerprint_from_vllm(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None) -> ModelFingerprint:
    from vllm.platforms import current_platform

    model = vllm_config.model_config
    layout = [current_platform.device_type, str(vllm_config.cache_config.cache_dtype)]
    if kv_cache_config is not None:
        for group in kv_cache_config.kv_cache_groups:
            spec = group.kv_cache_spec
            layout.append(f"{type(spec).__name__}:{getattr(spec, 'num_kv_heads', '')}x"
                          f"{getattr(spec, 'head_size', '')}:{getattr(spec, 'dtype', '')}:{len(group.layer_names)}")
    return ModelFingerprint(
        model=str(model.model),
        revision=str(model.revision or ""),
        dtype=str(model.dtype),
        kv_layout="|".join(layout),
        block_size=int(vllm_config.cache_config.block_size),
        tp_rank=0,
        tp_size=int(vllm_config.parallel_config.tensor_parallel_size),
    )
