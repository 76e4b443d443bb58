"""A tier kind and a codec defined outside kvtier, loaded by ``module:Class`` (tests/test_plugins.py)."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from kvtier.codecs.base import Codec
from kvtier.errors import ConfigError
from kvtier.keys import BlockKey
from kvtier.tiers.base import Tier
from kvtier.tiers.dram import DramOptions, DramTier


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


@dataclass(frozen=True)
class PoisonOptions(DramOptions):
    poison_put: int = -1  # the n-th put (0-based) stores a forged record instead of the block
    poison_rank: int = -1  # only on this tensor-parallel rank (-1: every rank)


class PoisonDramTier(DramTier):
    """A DRAM tier that stores one forged record: a consistent header claiming 2^40 raw bytes, as hostile
    storage would serve it. Used by the e2e tests to poison one block of a reused prefix."""

    kind = "poison-dram"
    Options = PoisonOptions

    def __init__(self, name: str, capacity: int, codec: object, policy: object, options: PoisonOptions) -> None:
        super().__init__(name, capacity, codec, policy, options)  # type: ignore[arg-type]
        self.poison_put = options.poison_put if options.poison_rank in (-1, _tp_rank()) else -1
        self.puts = 0

    def _write(self, key: BlockKey, record: bytes) -> None:
        if self.puts == self.poison_put:
            head = struct.pack("<4sBBBBQQQ16s", b"KVTB", 1, 1, 0, 1, 1 << 40, 64, 0, key)
            record = head + struct.pack("<II", zlib.crc32(head), 0) + bytes(64)
        self.puts += 1
        super()._write(key, record)


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # no distributed state: a single rank
        return 0
