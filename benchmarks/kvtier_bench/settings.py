"""Benchmark settings: built-in presets (small, large), YAML files that override them, and validation.

Presets: ``chat`` (the default: kvtier's regime, see PRESETS), ``quick`` (a smoke test; ``small`` is its earlier
name), ``long`` (one history past 32k tokens), ``large``. A settings file looks like this (every key is optional;
``preset`` names the base, default ``chat``)::

    preset: quick
    model: tiny                  # tiny | small | base (built locally by kvtier_bench.models) or a model directory
    float32_model: null          # where the models run in float32 (no native bf16): this model instead, e.g. a
                                 # smaller one that costs there what ``model`` costs in bf16; the byte sizes below
                                 # (given for ``model`` at 16 bits) are scaled to hold the same tokens
    workload:
      conversations: 4           # concurrent users
      turns: 3                   # user turns per conversation
      system_tokens: 384         # shared system prompt (same for everyone)
      document_tokens: 256       # per-user document in the first turn (0: none)
      question_tokens: 48        # each new user question
      answer_tokens: 32          # max_tokens of each answer (generated greedily, EOS ignored)
      arrival_rate: 0.5          # conversations per second, Poisson; 0 = everyone at t=0
      think_time_s: 1.0          # mean pause (exponential) between an answer and the next question
      seed: 0
      trace: null                # JSON file of OpenAI-messages conversations instead of generated ones
    engine:
      kv_cache_bytes: 3MiB       # vLLM's own KV space: small, so the histories do not fit
      reference_kv_cache_bytes: 64MiB   # the reference run's KV space: large, so it never evicts
      max_model_len: 1024
      block_size: 128
      multiprocessing: false     # false: engine core and worker in the driver process (fast start)
    tiers:                       # capacities used by the kvtier configurations
      dram: 64MiB                # kvtier-dram: everything fits
      small_dram: 1MiB           # the DRAM tier in front of disk (and S3): forces demotion
      disk: 256MiB
      small_disk: 1MiB           # the disk tier in front of S3
    configs: [vllm-no-prefix, vllm-prefix, kvtier-dram, kvtier-dram-disk, kvtier-dram-disk-s3,
              vllm-offloading, lmcache]
    policies: []                 # extra kvtier-dram-disk runs, one per eviction policy: [lru, lfu, arc, attention]
    rounds: 1                    # timed rounds per configuration, interleaved across configurations
    parallel_starts: 2           # engines starting at the same time (all stay up until the end)
    pause_idle: true             # SIGSTOP the other engines while one runs its round or correctness pass
    allocator: kvtier            # every engine on the glibc settings kvtier's worker applies (default: glibc's)
    timeout_s: 900               # per engine start, per round and for the correctness pass
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kvtier.errors import ConfigError
from kvtier.units import parse_size
from kvtier_bench.procs import ALLOCATORS

ALL_CONFIGS = ("vllm-no-prefix", "vllm-prefix", "kvtier-dram", "kvtier-dram-disk", "kvtier-dram-disk-s3",
               "vllm-offloading", "lmcache")
POLICIES = ("lru", "lfu", "arc", "attention")

PRESETS: dict[str, dict[str, Any]] = {
    # The default: kvtier's regime. Sixteen users share a 256-token system prompt, each brings a 1,792-token
    # document; histories grow from ~2.2k to ~2.5k tokens on a 26M-parameter model (recomputing a history costs
    # far more than loading it); ~36.5k distinct tokens of history, 4.8x vLLM's KV space (7,680 tokens: the
    # running requests fit, the idle conversations do not). kvtier keeps the idle histories in 48 MiB of DRAM over
    # an LZ4 disk tier. Three interleaved rounds; about 8.5 minutes on 2 cores. (Measured before: 8 users over a
    # 40 MiB KV space that held two running requests: every kvtier request queued for KV blocks, 4-5x the
    # reference's TTFT; arrivals at 2/s: the first turns' cold prefills saturated the engine and the second turns
    # queued behind them, ~7x.) Where the models run in float32 (no native bf16) the 26M model prefills ~5x slower
    # (2.1k tokens: 2.7 s on an AVX2-only 2-core EPYC against ~0.54 s with native bf16) and the preset outran the
    # machine (every configuration queued, 26 minutes a run); the 5M model prefills those tokens there in ~0.56 s,
    # so it stands in (float32_model), with the sizes scaled to hold the same tokens.
    "chat": {
        "model": "small",
        "float32_model": "tiny",
        "workload": {"conversations": 16, "turns": 4, "system_tokens": 256, "document_tokens": 1792,
                     "question_tokens": 96, "answer_tokens": 16, "arrival_rate": 1.0, "think_time_s": 3.5,
                     "seed": 0, "trace": None},
        "engine": {"kv_cache_bytes": "60MiB", "reference_kv_cache_bytes": "512MiB", "max_model_len": 4096,
                   "block_size": 128, "multiprocessing": False},
        "tiers": {"dram": "512MiB", "small_dram": "48MiB", "disk": "1GiB", "small_disk": "32MiB"},
        "configs": ["vllm-prefix", "kvtier-dram-disk"],
        "policies": [],
        "rounds": 3,
        "parallel_starts": 2,
        "pause_idle": True,
        "allocator": "kvtier",
        "timeout_s": 900,
    },
    # A smoke test in a couple of minutes: the tiny model, short histories (kvtier's gains are small here).
    "quick": {
        "model": "tiny",
        "float32_model": None,
        "workload": {"conversations": 4, "turns": 3, "system_tokens": 384, "document_tokens": 256,
                     "question_tokens": 48, "answer_tokens": 32, "arrival_rate": 0.5, "think_time_s": 1.0,
                     "seed": 0, "trace": None},
        "engine": {"kv_cache_bytes": "3MiB", "reference_kv_cache_bytes": "64MiB", "max_model_len": 1024,
                   "block_size": 128, "multiprocessing": False},
        "tiers": {"dram": "64MiB", "small_dram": "1MiB", "disk": "256MiB", "small_disk": "1MiB"},
        "configs": list(ALL_CONFIGS),
        "policies": [],
        "rounds": 1,
        "parallel_starts": 2,
        "pause_idle": True,
        "allocator": "kvtier",
        "timeout_s": 900,
    },
    # Long context: two conversations over a ~29k-token document; one history passes 32k tokens by its last
    # turn, where a recompute hurts most. Reports TTFT of the last turns and the bytes kvtier moved.
    "long": {
        "model": "tiny-32k",
        "float32_model": None,
        "workload": {"conversations": 2, "turns": 4, "system_tokens": 512, "document_tokens": 29184,
                     "question_tokens": 512, "answer_tokens": 64, "arrival_rate": 0.0, "think_time_s": 1.0,
                     "seed": 0, "trace": None},
        "engine": {"kv_cache_bytes": "80MiB", "reference_kv_cache_bytes": "512MiB", "max_model_len": 36864,
                   "block_size": 128, "multiprocessing": False},
        "tiers": {"dram": "512MiB", "small_dram": "64MiB", "disk": "1GiB", "small_disk": "64MiB"},
        "configs": ["vllm-prefix", "kvtier-dram-disk"],
        "policies": [],
        "rounds": 3,
        "parallel_starts": 2,
        "pause_idle": True,
        "allocator": "kvtier",
        "timeout_s": 3600,
    },
    "large": {
        "model": "small",
        "float32_model": None,
        "workload": {"conversations": 16, "turns": 6, "system_tokens": 512, "document_tokens": 1024,
                     "question_tokens": 64, "answer_tokens": 64, "arrival_rate": 0.5, "think_time_s": 3.0,
                     "seed": 0, "trace": None},
        "engine": {"kv_cache_bytes": "48MiB", "reference_kv_cache_bytes": "1GiB", "max_model_len": 4096,
                   "block_size": 128, "multiprocessing": False},
        "tiers": {"dram": "2GiB", "small_dram": "64MiB", "disk": "4GiB", "small_disk": "64MiB"},
        "configs": list(ALL_CONFIGS),
        "policies": list(POLICIES),
        "rounds": 3,
        "parallel_starts": 2,
        "pause_idle": True,
        "allocator": "kvtier",
        "timeout_s": 3600,
    },
}
PRESETS["small"] = PRESETS["quick"]  # the quick preset's earlier name
DEFAULT_PRESET = "chat"


@dataclass(frozen=True)
class WorkloadSettings:
    conversations: int
    turns: int
    system_tokens: int
    document_tokens: int
    question_tokens: int
    answer_tokens: int
    arrival_rate: float
    think_time_s: float
    seed: int
    trace: str | None


@dataclass(frozen=True)
class EngineSettings:
    kv_cache_bytes: int
    reference_kv_cache_bytes: int
    max_model_len: int
    block_size: int
    multiprocessing: bool


@dataclass(frozen=True)
class TierSizes:
    dram: int
    small_dram: int
    disk: int
    small_disk: int


@dataclass(frozen=True)
class BenchSettings:
    preset: str
    model: str
    workload: WorkloadSettings
    engine: EngineSettings
    tiers: TierSizes
    configs: tuple[str, ...]
    policies: tuple[str, ...]
    rounds: int
    parallel_starts: int
    timeout_s: float
    pause_idle: bool = True  # stop the other engines while one is measured
    allocator: str = "kvtier"  # kvtier_bench.procs.ALLOCATORS: every engine's glibc allocator settings
    float32_model: str | None = None  # runs instead of ``model`` where the models run in float32

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def load_settings(preset: str = DEFAULT_PRESET, path: str | None = None,
                  overrides: dict[str, Any] | None = None) -> BenchSettings:
    """Preset, then the YAML file (which may name another preset), then ``overrides`` (same structure)."""
    data: dict[str, Any] = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read benchmark settings: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        preset = data.pop("preset", preset)
    if preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r} (expected one of {sorted(PRESETS)})")
    merged = _merge(copy.deepcopy(PRESETS[preset]), _own_model(data), "")
    merged = _merge(merged, _own_model(overrides or {}), "")
    return _build(preset, merged)


def _own_model(layer: dict[str, Any]) -> dict[str, Any]:
    """A layer that names its own ``model`` runs it everywhere unless it also names a ``float32_model``."""
    return {"float32_model": None, **layer} if "model" in layer else layer


def _merge(base: dict[str, Any], extra: dict[str, Any], path: str) -> dict[str, Any]:
    for key, value in extra.items():
        where = f"{path}.{key}" if path else key
        if key not in base:
            raise ConfigError(f"{where}: unknown key (expected one of: {', '.join(sorted(base))})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping")
            _merge(base[key], value, where)
        else:
            base[key] = value
    return base


def _build(preset: str, d: dict[str, Any]) -> BenchSettings:
    w, e, t = d["workload"], d["engine"], d["tiers"]
    workload = WorkloadSettings(
        conversations=_int(w["conversations"], "workload.conversations", 1),
        turns=_int(w["turns"], "workload.turns", 1),
        system_tokens=_int(w["system_tokens"], "workload.system_tokens", 0),
        document_tokens=_int(w["document_tokens"], "workload.document_tokens", 0),
        question_tokens=_int(w["question_tokens"], "workload.question_tokens", 1),
        answer_tokens=_int(w["answer_tokens"], "workload.answer_tokens", 1),
        arrival_rate=_float(w["arrival_rate"], "workload.arrival_rate"),
        think_time_s=_float(w["think_time_s"], "workload.think_time_s"),
        seed=_int(w["seed"], "workload.seed", 0),
        trace=None if w["trace"] is None else str(w["trace"]),
    )
    engine = EngineSettings(
        kv_cache_bytes=_size(e["kv_cache_bytes"], "engine.kv_cache_bytes"),
        reference_kv_cache_bytes=_size(e["reference_kv_cache_bytes"], "engine.reference_kv_cache_bytes"),
        max_model_len=_int(e["max_model_len"], "engine.max_model_len", 16),
        block_size=_int(e["block_size"], "engine.block_size", 16),
        multiprocessing=bool(e["multiprocessing"]),
    )
    tiers = TierSizes(**{k: _size(t[k], f"tiers.{k}") for k in ("dram", "small_dram", "disk", "small_disk")})
    configs = tuple(str(c) for c in d["configs"])
    for c in configs:
        if c not in ALL_CONFIGS:
            raise ConfigError(f"configs: unknown configuration {c!r} (expected some of: {', '.join(ALL_CONFIGS)})")
    policies = tuple(str(p) for p in d["policies"])
    for p in policies:
        if p not in POLICIES:
            raise ConfigError(f"policies: unknown policy {p!r} (expected some of: {', '.join(POLICIES)})")
    if d["allocator"] not in ALLOCATORS:
        raise ConfigError(f"allocator: expected one of {', '.join(sorted(ALLOCATORS))}, got {d['allocator']!r}")
    stand_in = d["float32_model"]
    if stand_in is not None and (not isinstance(stand_in, str) or not stand_in):
        raise ConfigError(f"float32_model: expected a model name or directory, or null, got {stand_in!r}")
    return BenchSettings(preset, str(d["model"]), workload, engine, tiers, configs, policies,
                         _int(d["rounds"], "rounds", 1), _int(d["parallel_starts"], "parallel_starts", 1),
                         _float(d["timeout_s"], "timeout_s"), bool(d["pause_idle"]), str(d["allocator"]),
                         stand_in)


def _int(value: Any, path: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{path}: expected an integer >= {minimum}, got {value!r}")
    return value


def _float(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{path}: expected a number >= 0, got {value!r}")
    return float(value)


def _size(value: Any, path: str) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}, got {value!r}") from None
