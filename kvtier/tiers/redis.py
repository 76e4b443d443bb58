"""RedisTier: block records as binary Redis strings, and RedisPrefixIndex, a shared "who holds what" index.

Block keys are ``{key_prefix}:b:{hex}``; a SET replaces a value atomically, so a reader sees one writer's
complete record or none. ``ttl_s`` > 0 stores with EX: an expired block is a miss and is forgotten. When the
server reaches ``maxmemory`` a put raises TierFullError (nothing crashes, nothing already stored is lost).
The password is never logged; reprs and errors show the URL without credentials.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    OutOfMemoryError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from kvtier.codecs import BlockCodec
from kvtier.errors import TierError, TierFullError
from kvtier.keys import KEY_SIZE, BlockKey
from kvtier.policies.base import EvictionPolicy
from kvtier.tiers.base import StoredBlock
from kvtier.redact import redact_url
from kvtier.tiers.shared import BatchPutResult, SharedTier, parse_hex_key

log = logging.getLogger(__name__)
T = TypeVar("T")

PIPELINE_KEYS = 64                 # keys per pipelined round trip in get_many
PIPELINE_BYTES = 64 * 1024 * 1024  # bytes per pipelined round trip in put_many
_PASSWORD_HINT = "check the tier's 'password' setting or the password in 'url'"


@dataclass(frozen=True)
class RedisOptions:
    url: str = field(default="redis://127.0.0.1:6379/0", metadata={"url": True})
    password: str | None = field(default=None, repr=False, metadata={"secret": True})
    tls: bool = False
    tls_ca_file: str | None = None
    key_prefix: str = "kvtier"
    ttl_s: int = 0
    socket_timeout_s: float = 2.0
    shared_index: bool = False


def make_redis_client(options: RedisOptions) -> redis.Redis:
    url = options.url
    if options.tls and url.startswith("redis://"):
        url = "rediss://" + url[len("redis://"):]
    kwargs: dict[str, Any] = {
        "socket_timeout": options.socket_timeout_s,
        "socket_connect_timeout": options.socket_timeout_s,
        # One immediate retry heals a pooled connection the server closed; a dead server fails at once.
        "retry": Retry(NoBackoff(), 1),
    }
    if options.password:
        kwargs["password"] = options.password
    if url.startswith("rediss://") and options.tls_ca_file:
        kwargs["ssl_ca_certs"] = options.tls_ca_file
    return redis.Redis.from_url(url, **kwargs)


def _block_of(name: str, idle: Any, size: Any) -> StoredBlock | None:
    namespace, _, hexkey = name.rpartition(":b:")
    key = parse_hex_key(hexkey)
    if key is None or hexkey != hexkey.lower() or not isinstance(size, int) or size <= 0:
        return None  # not a block, or gone since the scan
    return StoredBlock(key, name, namespace, size, float(idle) if isinstance(idle, int) else None)


def _as_bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


class RedisPrefixIndex:
    """Which block keys exist in which shared tier, kept in Redis so one instance learns what another stored.

    Layout: the set ``{key_prefix}:index`` holds tier names; the hash ``{key_prefix}:index:{tier}`` maps each
    16-byte block key to its record size. The index is a hint, not the truth: a block that expired or was
    evicted by the server may still be listed until a reader finds it gone and removes it.
    Methods raise TierError when Redis fails; ``pipe`` lets a caller batch index updates with its own writes.
    """

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self.client = client
        self.root = f"{key_prefix}:index"

    def _hash(self, tier_name: str) -> str:
        return f"{self.root}:{tier_name}"

    def add(self, keys: Iterable[BlockKey], tier_name: str, sizes: Sequence[int] | None = None,
            pipe: Any = None) -> None:
        keys = list(keys)
        if not keys:
            return
        mapping: dict[Any, Any] = {k: (sizes[i] if sizes else 0) for i, k in enumerate(keys)}
        target = pipe if pipe is not None else self.client.pipeline(transaction=False)
        target.sadd(self.root, tier_name)
        target.hset(self._hash(tier_name), mapping=mapping)
        if pipe is None:
            self._run(target.execute)

    def remove(self, keys: Iterable[BlockKey], tier_name: str | None = None, pipe: Any = None) -> None:
        keys = list(keys)
        if not keys:
            return
        tiers = [tier_name] if tier_name else self.tiers()
        target = pipe if pipe is not None else self.client.pipeline(transaction=False)
        for name in tiers:
            target.hdel(self._hash(name), *keys)
        if pipe is None:
            self._run(target.execute)

    def tiers(self) -> list[str]:
        members: Any = self._run(lambda: self.client.smembers(self.root))
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    def which(self, keys: Sequence[BlockKey]) -> dict[BlockKey, list[str]]:
        """For each key some tier holds, the names of those tiers (keys nobody holds are left out)."""
        found: dict[BlockKey, list[str]] = {}
        tiers = self.tiers()
        if not keys or not tiers:
            return found
        pipe = self.client.pipeline(transaction=False)
        for name in tiers:
            pipe.hmget(self._hash(name), list(keys))
        for name, sizes in zip(tiers, self._run(pipe.execute)):
            for key, size in zip(keys, sizes):
                if size is not None:
                    found.setdefault(key, []).append(name)
        return found

    def members(self, tier_name: str) -> Iterator[tuple[BlockKey, int]]:
        """Every (key, size) recorded for ``tier_name``."""
        items = self._run(lambda: list(self.client.hscan_iter(self._hash(tier_name), count=1000)))
        for key, size in items:
            if len(key) == KEY_SIZE:
                yield bytes(key), int(size)

    @staticmethod
    def _run(fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RedisError as exc:
            raise TierError(f"shared index: {type(exc).__name__}: {exc}") from None


class RedisTier(SharedTier):
    kind = "redis"
    Options = RedisOptions
    default_codec = "planes"

    def __init__(self, name: str, capacity: int, codec: BlockCodec, policy: EvictionPolicy,
                 options: RedisOptions) -> None:
        super().__init__(name, capacity, codec, policy, label=f"tier {name!r} (redis)", max_concurrency=4)
        self.options = options
        self.url = redact_url(options.url)
        self.key_prefix = options.key_prefix
        try:
            self._client = make_redis_client(options)
        except (ValueError, RedisError) as exc:
            raise TierError(f"{self.label}: invalid Redis settings for {self.url}: {type(exc).__name__} "
                            "(check 'url', 'tls', 'tls_ca_file')") from None
        self.index = RedisPrefixIndex(self._client, options.key_prefix) if options.shared_index else None
        self._listing_is_complete = self.index is None
        try:
            self._check_server()
        except TierError:
            self._client.close()
            raise

    def __repr__(self) -> str:
        return (f"RedisTier(name={self.name!r}, url={self.url!r}, key_prefix={self.key_prefix!r}, "
                f"capacity={self.capacity})")

    def redis_key(self, key: BlockKey) -> str:
        return f"{self.key_prefix}:b:{key.hex()}"

    def _check_server(self) -> None:
        try:
            self._client.ping()
        except AuthenticationError:
            raise TierError(f"{self.label}: authentication failed at {self.url}: {_PASSWORD_HINT}") from None
        except ResponseError as exc:
            if "NOAUTH" in str(exc) or "AUTH" in str(exc):
                raise TierError(f"{self.label}: {self.url} refused authentication ({exc}): {_PASSWORD_HINT}") \
                    from None
            raise TierError(f"{self.label}: {self.url} answered PING with an error: {exc}") from None
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise TierError(f"{self.label}: cannot connect to Redis at {self.url} ({exc}; check 'url', "
                            "'tls', 'tls_ca_file' and that the server is running)") from None

    # ---- the boundary: every backend call goes through here -----------------------------------------
    def _call(self, op: str, fn: Callable[[], T]) -> T:
        self.breaker.check()
        try:
            result = fn()
        except AuthenticationError as exc:  # a ConnectionError subclass, but the server is alive
            raise TierError(f"{self.label}: {op} failed: {exc} ({_PASSWORD_HINT})") from None
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self.breaker.record_failure(f"{type(exc).__name__}: {exc}")
            raise TierError(f"{self.label}: {op} failed: {type(exc).__name__}: {exc}") from None
        except RedisError as exc:
            self.breaker.record_success()
            raise self._response_error(op, exc) from None
        self.breaker.record_success()
        return result

    def _response_error(self, op: str, exc: BaseException) -> TierError:
        if isinstance(exc, OutOfMemoryError) or str(exc).startswith("OOM"):
            return TierFullError(f"{self.label}: {op} refused, the server reached its maxmemory: {exc}")
        return TierError(f"{self.label}: {op} failed: {type(exc).__name__}: {exc}")

    def _queue_set(self, pipe: Any, key: BlockKey, record: bytes) -> None:
        pipe.set(self.redis_key(key), record, ex=self.options.ttl_s if self.options.ttl_s > 0 else None)

    # ---- storage primitives ---------------------------------------------------------------------------
    def _write(self, key: BlockKey, record: bytes) -> None:
        pipe = self._client.pipeline(transaction=False)
        self._queue_set(pipe, key, record)
        if self.index is not None:
            self.index.add([key], self.name, [len(record)], pipe=pipe)
        results = self._call("put", lambda: pipe.execute(raise_on_error=False))
        if isinstance(results[0], Exception):  # the SET; a failed index update only costs a hint
            raise self._response_error("put", results[0])

    def _read(self, key: BlockKey) -> bytes | None:
        return _as_bytes(self._call("get", lambda: self._client.get(self.redis_key(key))))

    def _discard(self, key: BlockKey) -> None:
        pipe = self._client.pipeline(transaction=False)
        pipe.delete(self.redis_key(key))
        if self.index is not None:
            self.index.remove([key], self.name, pipe=pipe)
        self._call("delete", pipe.execute)

    def _index_removed(self, keys: Sequence[BlockKey]) -> None:
        if self.index is not None:
            try:
                self._call("index update", lambda: self.index.remove(keys, self.name) if self.index else None)
            except TierError as exc:
                self._note_failure("index update", exc)

    # ---- listing: blocks are {key_prefix}:b:{hash}; a wider scope lists {scope}*:b:{hash} -----------------
    def location(self, scope: str | None = None) -> str:
        return f"{self.url} " + (f"{self.key_prefix}:b:*" if scope is None else f"{scope}*:b:*")

    def entries(self, scope: str | None = None) -> Iterator[StoredBlock]:
        if scope is None and self.index is not None:
            yield from self._entries_indexed(self.index)
            return
        pattern = f"{self.key_prefix}:b:*" if scope is None else f"{scope}*:b:*"
        names = self._call("list", lambda: list(self._client.scan_iter(match=pattern, count=1000)))
        for start in range(0, len(names), 500):
            chunk = names[start:start + 500]
            pipe = self._client.pipeline(transaction=False)
            for name in chunk:
                pipe.object("idletime", name)  # before anything that reads the value (it resets idle time)
                pipe.strlen(name)
            replies = self._call("list", lambda: pipe.execute(raise_on_error=False))  # noqa: B023
            for i, raw_name in enumerate(chunk):
                block = _block_of(bytes(raw_name).decode(errors="replace"), replies[2 * i], replies[2 * i + 1])
                if block is not None:
                    yield block

    def _entries_indexed(self, index: RedisPrefixIndex) -> Iterator[StoredBlock]:
        """The index's entries for this tier that still exist; stale ones (expired blocks) are pruned."""
        entries = self._call("list", lambda: list(index.members(self.name)))
        for start in range(0, len(entries), 1000):
            chunk = entries[start:start + 1000]
            pipe = self._client.pipeline(transaction=False)
            for key, _ in chunk:
                pipe.exists(self.redis_key(key))
            exists = self._call("list", pipe.execute)
            stale = [key for (key, _), alive in zip(chunk, exists) if not alive]
            if stale:
                self._index_removed(stale)
            for (key, size), alive in zip(chunk, exists):
                if alive:
                    yield StoredBlock(key, self.redis_key(key), self.key_prefix, size, None)

    def read_heads(self, blocks: Sequence[StoredBlock], size: int) -> list[bytes | None]:
        out: list[bytes | None] = []
        for start in range(0, len(blocks), 500):
            chunk = blocks[start:start + 500]
            pipe = self._client.pipeline(transaction=False)
            for block in chunk:
                pipe.getrange(block.name, 0, size - 1)
            try:
                replies = self._call("read", lambda: pipe.execute(raise_on_error=False))  # noqa: B023
            except TierError:
                replies = [None] * len(chunk)
            out.extend(bytes(r) if isinstance(r, bytes) and r else None for r in replies)
        return out

    def remove(self, blocks: Sequence[StoredBlock]) -> None:
        by_namespace: dict[str, list[StoredBlock]] = {}
        with self._lock:
            for block in blocks:
                self._unaccount(block.key)
                by_namespace.setdefault(block.namespace, []).append(block)
        for namespace, group in by_namespace.items():
            for start in range(0, len(group), 500):
                chunk = group[start:start + 500]
                pipe = self._client.pipeline(transaction=False)
                pipe.delete(*[b.name for b in chunk])
                # Drop them from that namespace's shared index too, if it keeps one (a no-op otherwise).
                RedisPrefixIndex(self._client, namespace).remove([b.key for b in chunk], pipe=pipe)
                self._call("delete", pipe.execute)

    # ---- batches: one round trip per chunk ------------------------------------------------------------
    def get_many(self, keys: Sequence[BlockKey]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for start in range(0, len(keys), PIPELINE_KEYS):
            chunk = keys[start:start + PIPELINE_KEYS]
            names = [self.redis_key(k) for k in chunk]
            try:
                values: Any = self._call("get", lambda: self._client.mget(names))  # noqa: B023 - called at once
            except TierError as exc:
                self._note_failure("get", exc)
                out.extend([None] * len(chunk))
                continue
            out.extend(self._after_read(k, _as_bytes(v)) for k, v in zip(chunk, values))
        return out

    def put_many(self, items: Iterable[tuple[BlockKey, bytes]]) -> BatchPutResult:
        result = BatchPutResult()
        batch: list[tuple[BlockKey, bytes, int]] = []
        batch_bytes = 0
        for key, record in items:
            try:
                victims, reserved = self._reserve(key, len(record))
            except TierError as exc:
                result.failed[key] = exc
                continue
            result.victims.extend(victims)
            batch.append((key, record, reserved))
            batch_bytes += len(record)
            if batch_bytes >= PIPELINE_BYTES:
                self._flush(batch, result)
                batch, batch_bytes = [], 0
        self._flush(batch, result)
        return result

    def _flush(self, batch: list[tuple[BlockKey, bytes, int]], result: BatchPutResult) -> None:
        if not batch:
            return
        pipe = self._client.pipeline(transaction=False)
        for key, record, _ in batch:
            self._queue_set(pipe, key, record)
        if self.index is not None:
            self.index.add([k for k, _, _ in batch], self.name, [len(r) for _, r, _ in batch], pipe=pipe)
        try:
            replies: list[Any] = self._call("put", lambda: pipe.execute(raise_on_error=False))
        except TierError as exc:
            replies = [exc] * len(batch)
        for (key, record, reserved), reply in zip(batch, replies):
            if isinstance(reply, BaseException):
                self._release(key, reserved)
                result.failed[key] = reply if isinstance(reply, TierError) else self._response_error("put", reply)
            else:
                self._commit(key, len(record), reserved)

    def close(self) -> None:
        super().close()
        self._client.close()
