"""kvtier's tiers behind vLLM's own OffloadingConnector, as a secondary tier of its CPU primary tier.

vLLM (0.32+) loads the manager from a ``secondary_tiers`` entry of ``TieringOffloadingSpec``::

    {"type": "KVTierSecondaryTier", "module_path": "kvtier.offload.secondary", "config": "kvtier.yaml"}

See docs/offload-secondary-tier.md. ``keys`` and ``jobs`` do not import vLLM; ``secondary`` does.
"""
