"""A tier kind and a codec defined outside kvtier, loaded by ``module:Class`` (tests/test_plugins.py)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from kvtier.codecs.base import Codec
from kvtier.errors import ConfigError
from kvtier.keys import BlockKey
from kvtier.tiers.base import Tier


@dataclass(frozen=True)
class DictOptions:
    label: str = "dict"
    max_records: int = 1000

    def __post_init__(self) -> None:
        if self.max_records <= 0:
            raise ConfigError(f"max_records: must be positive, got {self.max_records}")


class DictTier(Tier):
    """Records in a plain dict: the smallest complete tier kind."""

    kind = "dict"
    Options = DictOptions
    default_codec = "tests-zlib"
    hit_source = "host"

    def __init__(self, name: str, capacity: int, codec: object, policy: object, options: DictOptions) -> None:
        super().__init__(name, capacity, codec, policy)  # type: ignore[arg-type]
        self.options = options
        self.records: dict[BlockKey, bytes] = {}

    def _write(self, key: BlockKey, record: bytes) -> None:
        self.records[key] = bytes(record)

    def _read(self, key: BlockKey) -> bytes | None:
        return self.records.get(key)

    def _discard(self, key: BlockKey) -> None:
        self.records.pop(key, None)


class ZlibCodec(Codec):
    codec_id = 200
    name = "tests-zlib"

    def __init__(self, level: int = 6) -> None:
        self.level = level

    @classmethod
    def create(cls, level: int) -> ZlibCodec:
        if not 0 <= level <= 9:
            from kvtier.errors import CodecError
            raise CodecError(f"zlib: level must be 0..9, got {level}")
        return cls(level)

    def encode(self, data: bytes | memoryview) -> bytes:
        return zlib.compress(data, self.level)

    def decode(self, payload: bytes | memoryview, raw_size: int) -> bytes:
        out = zlib.decompressobj()
        data = out.decompress(payload, raw_size)
        if out.unconsumed_tail or not out.eof:
            raise ValueError("zlib payload longer than its raw size, or truncated")
        return data
