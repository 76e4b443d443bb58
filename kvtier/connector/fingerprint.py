"""The model fingerprint that namespaces block keys, derived from vLLM's config (scheduler side).

Besides the model, revision, dtype, KV layout, block size and parallel layout, ``semantics`` carries every
other setting that changes the KV bytes or what they mean: quantization, the KV-cache dtype and its scale
calculation, the attention-relevant parts of the HF config (RoPE, sliding window, heads) and any HF config
overrides, canonically as JSON. A setting that cannot be written canonically is named by its repr, which at
worst separates key spaces that could have been shared, never merges two that must not be.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

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
        semantics=semantics(vllm_config),
    )


# Attention-relevant fields of an HF model config: any of them changes the KV a prompt produces.
HF_FIELDS = ("rope_scaling", "rope_theta", "rope_parameters", "partial_rotary_factor", "rotary_dim",
             "sliding_window", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size",
             "num_hidden_layers", "max_position_embeddings", "attention_bias", "qk_layernorm", "use_qk_norm")


def semantics(vllm_config: VllmConfig) -> str:
    model = vllm_config.model_config
    cache = vllm_config.cache_config
    hf = getattr(model, "hf_text_config", None) or getattr(model, "hf_config", None)
    values: dict[str, Any] = {
        "quantization": model.quantization,
        "kv_cache_dtype": cache.cache_dtype,
        "calculate_kv_scales": getattr(cache, "calculate_kv_scales", None),
        "code_revision": getattr(model, "code_revision", None),
        "hf_overrides": getattr(model, "hf_overrides", None),
        "hf": {name: getattr(hf, name) for name in HF_FIELDS if hf is not None and hasattr(hf, name)},
    }
    return json.dumps(values, sort_keys=True, separators=(",", ":"), default=_canonical)


def _canonical(value: Any) -> str:
    """A stable name for what JSON cannot write: a callable by its qualified name (never an address)."""
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
    return repr(value)
