"""vLLM offload keys -> kvtier block keys.

vLLM names an offloaded chunk by an ``OffloadKey``: the block hash followed by 4 bytes of KV-cache group index.
kvtier's tiers index 16-byte keys. The mapping is a keyed BLAKE2b of the offload key, salted with a namespace
digest of everything that shapes the chunk's bytes (model, dtype, block and chunk sizes, cache groups,
parallel layout, the chunk's size in bytes) and an optional user namespace. Equal inputs give equal keys in
any process and after a restart; different models or layouts never share a key. No ``hash()``, no pickle.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from kvtier.keys import KEY_SIZE, BlockKey

FORMAT = "kvtier-vllm-offload/1"


def namespace_digest(fields: Mapping[str, Any], chunk_bytes: int, namespace: str = "") -> bytes:
    """Digest of the storage namespace: ``fields`` (JSON-serialisable), the chunk size and a user namespace."""
    payload = {"fields": dict(fields), "chunk_bytes": int(chunk_bytes), "namespace": namespace, "format": FORMAT}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(canonical, digest_size=KEY_SIZE, person=b"kvtier-vllm-ns").digest()


def offload_block_key(namespace: bytes, offload_key: bytes) -> BlockKey:
    """The kvtier key of one vLLM offload key inside ``namespace`` (a ``namespace_digest``)."""
    return hashlib.blake2b(offload_key, digest_size=KEY_SIZE, key=namespace, person=b"kvtier-offload").digest()
