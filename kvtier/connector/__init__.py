"""vLLM integration: ``kv_connector_module_path="kvtier.connector"`` finds KVTierConnector here."""

from kvtier.connector.connector import KVTierConnector

__all__ = ["KVTierConnector"]
