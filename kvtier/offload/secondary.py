"""KVTierSecondaryTier: kvtier's TierStack (disk, S3, Redis; codecs, checksums, eviction policies) as a
secondary tier of vLLM's OffloadingConnector (``TieringOffloadingSpec``, vLLM 0.32+).

vLLM keeps the chunks that the GPU offloads in its CPU primary tier (a shared-memory region, one row per
chunk) and cascades every stored chunk to each secondary tier; on a primary miss a secondary hit is promoted
back into a primary row. This class runs in vLLM's scheduler process, so every method returns at once:

- ``lookup`` answers from kvtier's local index (no I/O): HIT when a tier holds the key and its server is not
  known to be down; MISS otherwise, and for keys whose promotion already failed for this request.
- ``submit_store`` / ``submit_load`` queue one task per chunk on a bounded pool (``kvtier.offload.jobs``).
  A store encodes the primary row into the stack; a load reads the record, which the stack verifies (header,
  key, checksum) and decodes, and only verified bytes of exactly one row's size are copied into the row.
- ``get_finished_jobs`` reports the finished jobs; a partly failed promotion names the chunks that landed.

Enable it in a ``secondary_tiers`` entry: ``{"type": "KVTierSecondaryTier", "module_path":
"kvtier.offload.secondary", "config": "kvtier.yaml"}`` (or ``"tiers": [...]`` inline). See
docs/offload-secondary-tier.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, cast

from vllm.v1.kv_offload.base import (Locality, LookupResult, Medium, OffloadKey, ReqContext,
                                     RequestOffloadingContext)
from vllm.v1.kv_offload.tiering.base import JobResult, SecondaryTierManager, TransferJob

from kvtier.config import KVTierConfig
from kvtier.errors import ConfigError, KVTierError
from kvtier.keys import BlockKey
from kvtier.offload.jobs import BlockTask, Job, JobRunner
from kvtier.offload.keys import namespace_digest, offload_block_key
from kvtier.tiers.stack import TierStack

if TYPE_CHECKING:
    from vllm.v1.kv_offload.base import OffloadingSpec
    from vllm.v1.kv_offload.tiering.backpressure import BackpressureDetector

log = logging.getLogger(__name__)


def load_tier_config(config: str | None, tiers: list[Any] | None, options: dict[str, Any]) -> KVTierConfig:
    """The kvtier config of a secondary-tier entry: a YAML path (``config``) or an inline ``tiers`` list with
    optional top-level keys (``checksum``, ``promote_on_hit``); else ``$KVTIER_CONFIG``. Unlike the connector
    there is no built-in default: a DRAM tier behind vLLM's CPU tier must be asked for."""
    if config is not None:
        if tiers is not None or options:
            extra = sorted(options) or ["tiers"]
            raise ConfigError(f"secondary tier: 'config' is a YAML path; do not also give {extra}")
        return KVTierConfig.from_yaml(config)
    if tiers is not None:
        return KVTierConfig.from_dict({"tiers": tiers, **options}, source="secondary tier")
    env_path = os.environ.get("KVTIER_CONFIG")
    if env_path and not options:
        return KVTierConfig.from_yaml(env_path)
    raise ConfigError("secondary tier: set 'config' (a kvtier YAML path) or 'tiers' (an inline list of kvtier "
                      f"tiers) in the secondary_tiers entry{f'; got only {sorted(options)}' if options else ''}")


def vllm_namespace_fields(spec: OffloadingSpec) -> dict[str, Any]:
    """What shapes a chunk's bytes, as vLLM's own storage tiers name it (model, dtype, block sizes, groups,
    parallel layout unless the bytes are parallelism-agnostic, canonical format)."""
    from vllm.v1.kv_offload.file_mapper import FileMapper

    mapper = FileMapper.from_offloading_spec("", spec, blocks_per_file=spec.blocks_per_chunk,
                                             parallel_agnostic=True)
    return mapper.get_run_config()


class KVTierSecondaryTier(SecondaryTierManager):
    medium: ClassVar[Medium] = Medium.STORAGE

    def __init__(self, offloading_spec: OffloadingSpec, primary_kv_view: memoryview, tier_type: str,
                 config: str | None = None, tiers: list[Any] | None = None, namespace: str = "",
                 load_threads: int = 8, store_threads: int = 4, locality: str | None = None,
                 backpressure_detector: BackpressureDetector | None = None, **kvtier_options: Any) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        self.locality = Locality(locality) if locality is not None else None
        cfg = load_tier_config(config, tiers, kvtier_options)
        self._namespace = namespace_digest(vllm_namespace_fields(offloading_spec), self.block_size_bytes, namespace)
        self.stack = TierStack.from_config(cfg)  # raises TierError when a server is unreachable at start-up
        try:
            self._rows = primary_kv_view.cast("B")  # flat bytes; released in shutdown (vLLM unmaps the region)
        except TypeError as exc:
            self.stack.close()
            raise ConfigError(f"secondary tier: the primary tier's view is not a contiguous buffer ({exc})") from exc
        self._num_rows = len(primary_kv_view)
        self._tiers = {tier.name: tier for tier in self.stack.tiers}
        self._runner = JobRunner(load_threads, store_threads, name=f"kvtier-{tier_type}")
        # Per live request: keys whose promotion failed, answered MISS from then on (no retry loop).
        self._failed: dict[str, set[OffloadKey]] = {}
        self._warned: set[tuple[str, str]] = set()
        log.info("kvtier secondary tier %s: tiers %s, %d-byte chunks, namespace %s", tier_type,
                 [f"{t.name}:{t.kind}" for t in self.stack.tiers], self.block_size_bytes,
                 self._namespace.hex()[:12])

    def block_key(self, key: OffloadKey) -> BlockKey:
        """The kvtier key that stores ``key``'s chunk."""
        return offload_block_key(self._namespace, key)

    # ---- scheduler-side interface (all non-blocking) -------------------------------------------------------
    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        self._failed.setdefault(req_context.req_id, set())
        return RequestOffloadingContext()

    def on_request_finished(self, req_context: ReqContext) -> None:
        self._failed.pop(req_context.req_id, None)

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        if key in self._failed.get(req_context.req_id, ()):
            return LookupResult.MISS
        where = self.stack.where(self.block_key(key))
        if where is None or self._unreachable(where):
            return LookupResult.MISS
        return LookupResult.HIT

    def submit_store(self, job_metadata: TransferJob) -> None:
        self._submit(job_metadata, is_load=False)

    def submit_load(self, job_metadata: TransferJob) -> None:
        self._submit(job_metadata, is_load=True)

    def get_finished_jobs(self) -> Iterable[JobResult]:
        return [self._result(job) for job in self._runner.take_finished()]

    def has_pending_work(self) -> bool:
        return self._runner.in_flight > 0

    def drain_jobs(self) -> None:
        self._runner.drain()

    def shutdown(self) -> None:
        self._runner.shutdown()
        self.stack.close()
        self._rows.release()

    # ---- helpers ------------------------------------------------------------------------------------------
    def _submit(self, job_metadata: TransferJob, is_load: bool) -> None:
        keys = list(job_metadata.keys)
        chunk_ids = [int(c) for c in job_metadata.chunk_ids]
        job = Job(job_metadata.job_id, is_load, job_metadata.req_context.req_id, keys,
                  submitted=job_metadata.submit_time)
        if len(keys) != len(chunk_ids):
            log.error("kvtier offload: job %d has %d keys but %d chunk ids; failing it", job.job_id, len(keys),
                      len(chunk_ids))
            tasks: Sequence[BlockTask] = [lambda: False] * len(keys)
        else:
            one = self._load_one if is_load else self._store_one
            tasks = [partial(one, key, chunk) for key, chunk in zip(keys, chunk_ids)]
        self._runner.submit(job, tasks)

    def _result(self, job: Job) -> JobResult:
        keys = cast(list[OffloadKey], job.keys)
        landed = [k for k, ok in zip(keys, job.done) if ok]
        success = len(landed) == len(keys)
        if job.is_load and not success:
            failed = self._failed.get(job.owner)
            if failed is not None:
                failed.update(k for k, ok in zip(keys, job.done) if not ok)
            log.debug("kvtier offload: promotion job %d loaded %d of %d chunks", job.job_id, len(landed),
                      len(keys))
        return JobResult(job_id=job.job_id, success=success,
                         successful_keys=tuple(landed) if job.is_load and landed and not success else None,
                         transfer_time=job.seconds, transfer_bytes=len(landed) * self.block_size_bytes)

    def _row(self, chunk: int) -> memoryview | None:
        if not 0 <= chunk < self._num_rows:
            self._warn_once("address", KVTierError(f"chunk id {chunk} is outside the primary tier's "
                                                   f"{self._num_rows} rows"))
            return None
        start = chunk * self.block_size_bytes
        return self._rows[start:start + self.block_size_bytes]

    def _store_one(self, key: OffloadKey, chunk: int) -> bool:
        block_key = self.block_key(key)
        if self.stack.where(block_key) is not None:
            return True  # already held (stored by an earlier residency or another instance)
        row = self._row(chunk)
        if row is None:
            return False
        try:
            return self.stack.put(block_key, row)  # the row stays pinned until this job is reported
        except KVTierError as exc:
            self._warn_once("store", exc)
            return False

    def _load_one(self, key: OffloadKey, chunk: int) -> bool:
        row = self._row(chunk)
        if row is None:
            return False
        try:
            found = self.stack.get(self.block_key(key))  # verified and decoded, or None (miss, corrupt, down)
        except KVTierError as exc:
            self._warn_once("load", exc)
            return False
        if found is None:
            return False
        raw, tier = found
        if len(raw) != len(row):  # a verified record of another chunk size: never copy it into the row
            self._warn_once("load", KVTierError(f"tier {tier} holds {len(raw)} bytes for a {len(row)}-byte chunk"))
            return False
        row[:] = raw
        return True

    def _warn_once(self, op: str, exc: KVTierError) -> None:
        """A chunk that failed with a kvtier error: logged once per operation and error type, then at debug."""
        kind = (op, type(exc).__name__)
        if kind in self._warned:
            log.debug("kvtier offload: %s of a chunk failed: %s", op, exc)
            return
        self._warned.add(kind)
        log.warning("kvtier offload: %s of a chunk failed: %s (reported as a failed transfer; further %s errors "
                    "logged at debug level)", op, exc, kind[1])

    def _unreachable(self, tier_name: str) -> bool:
        """True while the tier's circuit breaker says its server is down (a promotion would only fail)."""
        breaker = getattr(self._tiers.get(tier_name), "breaker", None)
        return breaker is not None and breaker.is_open
