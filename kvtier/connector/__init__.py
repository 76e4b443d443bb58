"""vLLM integration: ``kv_connector_module_path="kvtier.connector"`` finds KVTierConnector here.

The class is imported on first access, so the worker side (``kvtier.connector.worker``) imports on machines
without vLLM (the GPU check, scripts/gpu-check.sh); ``getattr(module, "KVTierConnector")`` is what vLLM does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvtier.connector.connector import KVTierConnector

__all__ = ["KVTierConnector"]


def __getattr__(name: str) -> Any:
    if name == "KVTierConnector":
        from kvtier.connector.connector import KVTierConnector

        return KVTierConnector
    raise AttributeError(f"module 'kvtier.connector' has no attribute {name!r}")
