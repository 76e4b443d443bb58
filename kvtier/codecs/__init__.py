"""Codecs (none, lz4, zstd), the byte-plane shuffle filter and the checksummed block record."""

from __future__ import annotations

from kvtier.codecs.base import Codec
from kvtier.codecs.lz4 import Lz4Codec
from kvtier.codecs.none import NoneCodec
from kvtier.codecs.record import HEADER_SIZE, decode_record, encode_record, read_header
from kvtier.codecs.zstd import ZstdCodec
from kvtier.config import CodecConfig

__all__ = ["Codec", "BlockCodec", "Lz4Codec", "NoneCodec", "ZstdCodec", "HEADER_SIZE", "make_codec",
           "decode_record", "encode_record", "read_header", "ALL_DECODERS"]


def make_codec(cfg: CodecConfig) -> Codec:
    if cfg.name == "lz4":
        return Lz4Codec()
    if cfg.name == "zstd":
        return ZstdCodec(cfg.level)
    return NoneCodec()


ALL_DECODERS: dict[int, Codec] = {c.codec_id: c for c in (NoneCodec(), Lz4Codec(), ZstdCodec())}


class BlockCodec:
    """A tier's codec settings bound together: raw block bytes <-> verified records."""

    def __init__(self, cfg: CodecConfig, checksum_alg: str = "xxh3") -> None:
        self.cfg = cfg
        self.codec = make_codec(cfg)
        self.checksum_alg = checksum_alg

    def encode(self, key: bytes, raw: bytes | memoryview) -> bytes:
        return encode_record(key, raw, self.codec, self.cfg.shuffle, self.checksum_alg)

    def decode(self, key: bytes, record: bytes | memoryview) -> bytes:
        """Raises CorruptBlockError unless ``record`` is exactly what ``encode(key, raw)`` produced."""
        return decode_record(record, key, ALL_DECODERS)

    def same_format(self, other: BlockCodec) -> bool:
        return self.cfg == other.cfg and self.checksum_alg == other.checksum_alg
