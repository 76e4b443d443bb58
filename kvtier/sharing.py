"""SharedPlacement: a live index of the blocks on shared tiers, kept in Redis, so engines see each other's saves.

Every instance publishes what its shared tiers (S3, Redis) gain and lose; a scheduler asks it, for the blocks
of a request past its own index, in one round trip (a pipelined HMGET per shared tier). The layout is
RedisPrefixIndex's: the hash ``{key_prefix}:index:{tier name}`` maps each 16-byte (shard) key to its record
size. Give every engine that shares a tier the same ``key_prefix`` and tier names.

The index is a hint: an entry may outlive its block (another instance evicted it, the server lost it); the
load then misses, the entry is removed, and vLLM recomputes. A lookup waits at most ``timeout_s`` and a
failing index fails fast behind a circuit breaker: a slow or dead index costs a miss, never a stall.
Publishing runs on a background thread in batches; what cannot be published is counted and dropped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from kvtier.keys import BlockKey
from kvtier.redact import redact_url
from kvtier.tiers.breaker import CircuitBreaker, CircuitOpenError
from kvtier.tiers.redis_index import RedisPrefixIndex

if TYPE_CHECKING:
    from kvtier.config import PlacementIndexConfig

log = logging.getLogger("kvtier.sharing")
BATCH = 512  # index updates per pipelined round trip
LATENCY_SAMPLES = 4096


class SharedPlacement:
    def __init__(self, cfg: PlacementIndexConfig, tiers: Sequence[str]) -> None:
        assert cfg.url
        self.tiers = list(tiers)
        self.label = f"placement index {redact_url(cfg.url)} {cfg.key_prefix}:index:*"
        url = "rediss://" + cfg.url[len("redis://"):] if cfg.tls and cfg.url.startswith("redis://") else cfg.url
        kwargs: dict[str, Any] = {"socket_timeout": cfg.timeout_s, "socket_connect_timeout": cfg.timeout_s,
                                  "retry": Retry(NoBackoff(), 0)}
        if cfg.password:
            kwargs["password"] = cfg.password
        if url.startswith("rediss://") and cfg.tls_ca_file:
            kwargs["ssl_ca_certs"] = cfg.tls_ca_file
        self.client = redis.Redis.from_url(url, **kwargs)
        self.index = RedisPrefixIndex(self.client, cfg.key_prefix)
        self.breaker = CircuitBreaker(self.label, probe=self.client.ping)
        self.latencies: list[float] = []  # seconds per lookup, the last LATENCY_SAMPLES
        self.counters = {"lookups": 0, "lookup_failures": 0, "published": 0, "publish_failures": 0}
        self._updates: queue.SimpleQueue[tuple[str, BlockKey, str, int]] = queue.SimpleQueue()
        self._publisher: threading.Thread | None = None
        self._in_flight = 0

    # ---- the scheduler's side: where are these blocks? -------------------------------------------------
    def lookup(self, keys: Sequence[BlockKey]) -> dict[BlockKey, str]:
        """The shared tier holding each of ``keys`` (keys nobody holds are left out); {} when the index is
        slow, down or answers nonsense."""
        if not keys or not self.tiers:
            return {}
        try:
            self.breaker.check(may_probe=False)
        except CircuitOpenError:
            return {}
        start = time.perf_counter()
        self.counters["lookups"] += 1
        try:
            pipe = self.client.pipeline(transaction=False)
            for tier in self.tiers:
                pipe.hmget(self.index.hash_name(tier), list(keys))
            replies: Any = pipe.execute()
        except (RedisError, OSError) as exc:
            self.counters["lookup_failures"] += 1
            self.breaker.record_failure(f"{type(exc).__name__}: {exc}")
            return {}
        self.breaker.record_success()
        self._sample(time.perf_counter() - start)
        found: dict[BlockKey, str] = {}
        for tier, sizes in zip(self.tiers, replies):
            for key, size in zip(keys, sizes):
                if key not in found and _positive_int(size):
                    found[key] = tier
        return found

    def _sample(self, seconds: float) -> None:
        self.latencies.append(seconds)
        if len(self.latencies) > LATENCY_SAMPLES:
            del self.latencies[:LATENCY_SAMPLES // 2]

    def latency_ms(self) -> dict[str, float]:
        """p50 / p99 / max of recent lookups, in milliseconds."""
        if not self.latencies:
            return {}
        ordered = sorted(self.latencies)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
        return {"p50": round(pick(0.5), 3), "p99": round(pick(0.99), 3), "max": round(ordered[-1] * 1000, 3),
                "n": len(ordered)}

    # ---- the workers' side: what our shared tiers gained and lost --------------------------------------
    def note(self, change: str, key: BlockKey, tier: str, size: int = 0) -> None:
        """Queue ``change`` ("add" or "remove") of ``key`` on shared tier ``tier`` for publication."""
        self._updates.put((change, key, tier, size))
        if self._publisher is None:
            self._publisher = threading.Thread(target=self._publish_forever, name="kvtier-placement", daemon=True)
            self._publisher.start()

    def _publish_forever(self) -> None:
        while True:
            batch = [self._updates.get()]
            self._in_flight = 1
            while len(batch) < BATCH:
                try:
                    batch.append(self._updates.get_nowait())
                except queue.Empty:
                    break
            try:
                self.publish(batch)
            finally:
                self._in_flight = 0

    def publish(self, batch: Sequence[tuple[str, BlockKey, str, int]]) -> None:
        try:
            self.breaker.check(may_probe=True)
            pipe = self.client.pipeline(transaction=False)
            for change, key, tier, size in batch:
                if change == "add":
                    self.index.add([key], tier, [max(1, size)], pipe=pipe)
                else:
                    self.index.remove([key], tier, pipe=pipe)
            pipe.execute()
        except (RedisError, OSError, CircuitOpenError) as exc:
            self.counters["publish_failures"] += len(batch)
            if not isinstance(exc, CircuitOpenError):
                self.breaker.record_failure(f"{type(exc).__name__}: {exc}")
            return
        self.breaker.record_success()
        self.counters["published"] += len(batch)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (a while) until queued updates are published: for tests and shutdown."""
        deadline = time.monotonic() + timeout
        while (not self._updates.empty() or self._in_flight) and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self.client.close()


def _positive_int(value: Any) -> bool:
    try:
        return int(value) > 0
    except (TypeError, ValueError):
        return False
