"""Block keys: a chained BLAKE2b hash of each full block's token ids and its parent key.

The chain is rooted in a model fingerprint (model, revision, dtype, KV layout, block size, TP rank/size,
format version) and the request's cache_salt, so the same tokens give the same key in any process, on any
host and after a restart, and never collide across models or layouts. No Python ``hash()``, no pickle.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass

KEY_SIZE = 16
FORMAT_VERSION = 1

BlockKey = bytes  # KEY_SIZE bytes


@dataclass(frozen=True)
class ModelFingerprint:
    model: str
    revision: str = ""
    dtype: str = ""
    kv_layout: str = ""
    block_size: int = 0
    tp_rank: int = 0
    tp_size: int = 1
    format_version: int = FORMAT_VERSION

    def digest(self) -> bytes:
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.blake2b(canonical, digest_size=KEY_SIZE, person=b"kvtier-model").digest()

    def short_id(self) -> str:
        return self.digest().hex()[:12]


def root_key(fingerprint: ModelFingerprint, cache_salt: str | None = None) -> BlockKey:
    """The parent of a sequence's first block; a different salt gives a disjoint key space."""
    base = fingerprint.digest()
    if not cache_salt:
        return base
    return hashlib.blake2b(base + cache_salt.encode(), digest_size=KEY_SIZE, person=b"kvtier-salt").digest()


def chain_key(parent: BlockKey, token_ids: Sequence[int]) -> BlockKey:
    payload = struct.pack(f"<{len(token_ids)}q", *token_ids)
    return hashlib.blake2b(parent + payload, digest_size=KEY_SIZE, person=b"kvtier-block").digest()


def block_keys(
    fingerprint: ModelFingerprint,
    token_ids: Sequence[int],
    block_size: int,
    cache_salt: str | None = None,
    start_parent: BlockKey | None = None,
) -> list[BlockKey]:
    """Keys of every *full* block of ``token_ids`` (a partial tail block gets none)."""
    parent = start_parent if start_parent is not None else root_key(fingerprint, cache_salt)
    keys: list[BlockKey] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = chain_key(parent, token_ids[start:start + block_size])
        keys.append(parent)
    return keys


class KeyChain:
    """Incremental keys for a growing request: only new full blocks are hashed on each call."""

    def __init__(self, fingerprint: ModelFingerprint, block_size: int, cache_salt: str | None = None) -> None:
        self.block_size = block_size
        self.keys: list[BlockKey] = []
        self._root = root_key(fingerprint, cache_salt)

    def extend(self, token_ids: Sequence[int]) -> list[BlockKey]:
        full = len(token_ids) // self.block_size
        parent = self.keys[-1] if self.keys else self._root
        for i in range(len(self.keys), full):
            parent = chain_key(parent, token_ids[i * self.block_size:(i + 1) * self.block_size])
            self.keys.append(parent)
        return self.keys
