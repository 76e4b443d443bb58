"""Block keys: a chained BLAKE2b hash of each full block's token ids and its parent key.

The chain is rooted in a model fingerprint (model, revision, dtype, KV layout, block size, TP rank/size, and
everything else that changes the KV bytes or their meaning: quantization, KV-cache dtype, RoPE settings, HF
config overrides; format version) and in the request's identity: its ``cache_salt``, its LoRA adapter and the
engine's reset epoch. A request whose tokens do not say what its KV is (prompt embeddings) folds a digest of
each block's embeddings into that block's key. So the same inputs give the same key in any process, on any
host and after a restart, and inputs that give different KV never share a key. No Python ``hash()``, no pickle.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

KEY_SIZE = 16
FORMAT_VERSION = 2  # 2: semantics (quantization, RoPE, overrides) in the fingerprint; LoRA, epoch, embeddings

BlockKey = bytes  # KEY_SIZE bytes
BlockExtra = Callable[[int], bytes]  # block index -> bytes folded into that block's key (b"" for none)


@dataclass(frozen=True)
class ModelFingerprint:
    model: str
    revision: str = ""
    dtype: str = ""
    kv_layout: str = ""
    block_size: int = 0
    tp_rank: int = 0
    tp_size: int = 1
    semantics: str = ""  # canonical JSON of the other settings that change KV (see connector/fingerprint.py)
    format_version: int = FORMAT_VERSION

    def digest(self) -> bytes:
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.blake2b(canonical, digest_size=KEY_SIZE, person=b"kvtier-model").digest()

    def short_id(self) -> str:
        return self.digest().hex()[:12]


@dataclass(frozen=True)
class RequestIdentity:
    """What besides its tokens makes a request's KV what it is."""

    cache_salt: str | None = None
    lora: tuple[str, str] | None = None  # (adapter name, adapter path): vLLM hashes both
    epoch: int = 0  # bumped when the connector's cache is reset: nothing stored before is served again


def root_key(fingerprint: ModelFingerprint, cache_salt: str | None = None,
             identity: RequestIdentity | None = None) -> BlockKey:
    """The parent of a sequence's first block; a different salt, adapter or epoch gives a disjoint key space."""
    identity = identity or RequestIdentity(cache_salt)
    key = fingerprint.digest()
    if identity.cache_salt:
        key = hashlib.blake2b(key + identity.cache_salt.encode(), digest_size=KEY_SIZE, person=b"kvtier-salt").digest()
    if identity.lora is not None:
        name, path = identity.lora
        key = hashlib.blake2b(b"\0".join((key, name.encode(), path.encode())), digest_size=KEY_SIZE,
                              person=b"kvtier-lora").digest()
    if identity.epoch:
        key = hashlib.blake2b(key + struct.pack("<Q", identity.epoch), digest_size=KEY_SIZE,
                              person=b"kvtier-epoch").digest()
    return key


def rank_key(key: BlockKey, rank: int, world: int) -> BlockKey:
    """The key of one rank's shard of a block under tensor/pipeline parallelism (each rank stores its own
    shard); the block's own key when a single rank holds the whole block."""
    if world <= 1:
        return key
    return hashlib.blake2b(key + struct.pack("<II", rank, world), digest_size=KEY_SIZE, person=b"kvtier-rank").digest()


def chain_key(parent: BlockKey, token_ids: Sequence[int], extra: bytes = b"") -> BlockKey:
    payload = struct.pack(f"<{len(token_ids)}q", *token_ids)
    if extra:
        payload += b"\0extra\0" + extra
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

    def __init__(self, fingerprint: ModelFingerprint, block_size: int, cache_salt: str | None = None,
                 identity: RequestIdentity | None = None, block_extra: BlockExtra | None = None) -> None:
        self.block_size = block_size
        self.keys: list[BlockKey] = []
        self._root = root_key(fingerprint, cache_salt, identity)
        self._extra = block_extra

    def extend(self, token_ids: Sequence[int]) -> list[BlockKey]:
        full = len(token_ids) // self.block_size
        parent = self.keys[-1] if self.keys else self._root
        for i in range(len(self.keys), full):
            extra = self._extra(i) if self._extra is not None else b""
            parent = chain_key(parent, token_ids[i * self.block_size:(i + 1) * self.block_size], extra)
            self.keys.append(parent)
        return self.keys
