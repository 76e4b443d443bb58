"""RedisTier: block records as binary Redis strings (the shared index is kvtier/tiers/redis_index.py).

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
from kvtier.keys import BlockKey
from kvtier.policies.base import EvictionPolicy
from kvtier.redact import redact_url, redacted_repr
from kvtier.schema import bounded
from kvtier.security import host_of, is_loopback
from kvtier.tiers.base import BatchPutResult, StoredBlock
from kvtier.tiers.redis_index import RedisPrefixIndex
from kvtier.tiers.shared import TOO_LARGE, Fetched, FetchJob, SharedTier, parse_hex_key

log = logging.getLogger(__name__)
T = TypeVar("T")

PIPELINE_KEYS = 64                 # keys per pipelined round trip in get_many
PIPELINE_BYTES = 64 * 1024 * 1024  # bytes per pipelined round trip in put_many
_PASSWORD_HINT = "check the tier's 'password' setting or the password in 'url'"


@dataclass(frozen=True, repr=False)
class RedisOptions:
    __repr__ = redacted_repr

    url: str = field(default="redis://127.0.0.1:6379/0", metadata={"url": True})
    password: str | None = field(default=None, repr=False, metadata={"secret": True})
    tls: bool = False
    tls_ca_file: str | None = None
    key_prefix: str = "kvtier"
    ttl_s: int = bounded(0, 0)
    connect_timeout_s: float = bounded(1.0, 0.001, 600)
    load_timeout_s: float = bounded(1.0, 0.001, 600)  # all a load waits for this tier, in total
    save_timeout_s: float = bounded(5.0, 0.001, 3600)  # per command of a background save
    shared_index: bool = False


def make_redis_client(options: RedisOptions, for_loads: bool = False) -> redis.Redis:
    """A client for loads (short timeout, no retry after a timeout) or for saves and listings."""
    url = options.url
    if options.tls and url.startswith("redis://"):
        url = "rediss://" + url[len("redis://"):]
    timeout = options.load_timeout_s if for_loads else options.save_timeout_s
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": min(options.connect_timeout_s, timeout),
        # One immediate retry heals a pooled connection the server closed; a timeout is never retried.
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
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


class RedisTier(SharedTier):
    kind = "redis"
    Options = RedisOptions
    default_codec = "planes"

    def __init__(self, name: str, capacity: int, codec: BlockCodec, policy: EvictionPolicy,
                 options: RedisOptions) -> None:
        super().__init__(name, capacity, codec, policy, label=f"tier {name!r} (redis)", max_concurrency=4,
                         load_timeout_s=options.load_timeout_s)
        self.options = options
        self.url = redact_url(options.url)
        self.key_prefix = options.key_prefix
        try:
            self._client = make_redis_client(options)
            self._load_client = make_redis_client(options, for_loads=True)
        except (ValueError, RedisError) as exc:
            raise TierError(f"{self.label}: invalid Redis settings for {self.url}: {type(exc).__name__} "
                            "(check 'url', 'tls', 'tls_ca_file')") from None
        self.index = RedisPrefixIndex(self._client, options.key_prefix) if options.shared_index else None
        self._listing_is_complete = self.index is None
        try:
            self._check_server()
        except TierError:
            self.close()
            raise

    @classmethod
    def transport_warnings(cls, options: RedisOptions) -> list[str]:
        url = options.url
        if is_loopback(host_of(url)):
            return []
        out = []
        if not (options.tls or url.lower().startswith("rediss://")):
            out.append(f"{redact_url(url)} is reached without TLS: KV crosses the network in clear "
                       "(set tls: true or use rediss://)")
        userinfo = url.partition("://")[2].rpartition("@")[0]
        if not (options.password or userinfo or "password=" in url):
            out.append(f"{redact_url(url)} is reached without a password: anyone on the network can read and "
                       "write its blocks (set password, or a password in url)")
        return out

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
    def _call(self, op: str, fn: Callable[[], T], may_probe: bool = True) -> T:
        self.breaker.check(may_probe)
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

    def _fetch_jobs(self, keys: Sequence[BlockKey]) -> list[FetchJob]:
        jobs: list[FetchJob] = []
        for start in range(0, len(keys), PIPELINE_KEYS):
            chunk = list(keys[start:start + PIPELINE_KEYS])
            jobs.append((list(range(start, start + len(chunk))), lambda chunk=chunk: self._fetch(chunk)))
        return jobs

    def _fetch(self, keys: list[BlockKey]) -> list[Fetched]:
        """One round trip. With a size limit, GETRANGE reads at most limit + 1 bytes of each value: a value that
        long is larger than any valid record and is refused; an empty one is absent."""
        limit = self.max_record_bytes
        pipe = self._load_client.pipeline(transaction=False)
        for key in keys:
            if limit is None:
                pipe.get(self.redis_key(key))
            else:
                pipe.getrange(self.redis_key(key), 0, limit)
        values = self._call("get", pipe.execute, may_probe=False)
        out: list[Fetched] = []
        for value in values:
            if not value:
                out.append(None)
            elif limit is not None and len(value) > limit:
                out.append(TOO_LARGE)
            else:
                out.append(bytes(value))
        return out

    def _probe(self) -> None:
        self._client.ping()

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
        if index.malformed:
            log.warning("%s: ignored %d malformed shared-index entries", self.label, index.malformed)
            self.malformed_entries += index.malformed
            index.malformed = 0
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
        if hasattr(self, "_load_client"):
            self._load_client.close()
