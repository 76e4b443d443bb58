"""One way to open every plug-in point: a registered name, or ``package.module:ClassName``.

Tier kinds, codecs and eviction policies are each a ``Registry``: built-in names map to import paths (so
nothing is imported until used), ``register`` adds names at run time, and anything else that looks like
``pkg.mod:Class`` is imported and checked against the plug-in's ABC. Errors are ConfigErrors that name the key
path, the names known and the form of a custom reference.
"""

from __future__ import annotations

import importlib
from typing import Any, Generic, TypeVar

from kvtier.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str, base: str, builtins: dict[str, str]) -> None:
        self.what = what          # "tier kind", "codec", "policy": used in messages
        self._base = base         # "module:Class" of the ABC every plug-in subclasses
        self._refs: dict[str, str | type[T]] = dict(builtins)

    def names(self) -> list[str]:
        return sorted(self._refs)

    def register(self, name: str, ref: str | type[T]) -> None:
        """Make ``name`` resolve to ``ref`` (a class or ``pkg.mod:Class``) in this process."""
        if not name or ":" in name:
            raise ValueError(f"{self.what} name {name!r}: expected a plain name without ':'")
        self._refs[name] = ref

    def resolve(self, name: Any, path: str) -> type[T]:
        """The class ``name`` refers to; ConfigError naming ``path`` when it is unknown or not a plug-in."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{path}: expected a {self.what} name, got {name!r}")
        ref = self._refs.get(name, name if ":" in name else None)
        if ref is None:
            raise ConfigError(f"{path}: unknown {self.what} {name!r}; expected one of {self.names()} "
                              "or 'package.module:ClassName'")
        cls = ref if isinstance(ref, type) else _import(ref, f"{path}: cannot load {self.what} {ref!r}", self.names())
        base = _import(self._base, f"{self.what} base class", [])
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise ConfigError(f"{path}: {ref!r} is not a {base.__name__} subclass")
        return cls


def _import(ref: str, context: str, known: list[str]) -> Any:
    module_name, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        hint = f"; use one of {known} or 'package.module:ClassName'" if known else ""
        raise ConfigError(f"{context} ({type(exc).__name__}: {exc}){hint}") from exc


TIERS: Registry[Any] = Registry("tier kind", "kvtier.tiers.base:Tier", {
    "dram": "kvtier.tiers.dram:DramTier",
    "disk": "kvtier.tiers.disk:DiskTier",
    "s3": "kvtier.tiers.s3:S3Tier",
    "redis": "kvtier.tiers.redis:RedisTier",
})
CODECS: Registry[Any] = Registry("codec", "kvtier.codecs.base:Codec", {
    "none": "kvtier.codecs.none:NoneCodec",
    "lz4": "kvtier.codecs.lz4:Lz4Codec",
    "zstd": "kvtier.codecs.zstd:ZstdCodec",
    "planes": "kvtier.codecs.planes:PlanesCodec",
})
POLICIES: Registry[Any] = Registry("policy", "kvtier.policies.base:EvictionPolicy", {
    "lru": "kvtier.policies.lru:LRUPolicy",
    "lfu": "kvtier.policies.lfu:LFUPolicy",
    "arc": "kvtier.policies.arc:ARCPolicy",
    "attention": "kvtier.policies.attention_arc:AttentionARCPolicy",
    "attention-decay": "kvtier.policies.attention:AttentionPolicy",
})
