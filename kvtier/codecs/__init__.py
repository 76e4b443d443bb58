"""Codecs (none, lz4, zstd, planes, or ``package.module:Class``), the byte-plane shuffle and the checksummed
record."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvtier.codecs.base import Codec, RawBytes
from kvtier.codecs.lz4 import Lz4Codec
from kvtier.codecs.none import NoneCodec
from kvtier.codecs.planes import PlanesCodec
from kvtier.codecs.record import (
    HEADER_SIZE,
    MAC_SIZE,
    RecordHeader,
    checksum_parts,
    decode_record,
    encode_record,
    max_record_size,
    open_record,
    parse_header,
    read_header,
)
from kvtier.codecs.zstd import ZstdCodec
from kvtier.errors import CodecError, ConfigError
from kvtier.plugins import CODECS

if TYPE_CHECKING:
    from kvtier.config import CodecConfig

__all__ = ["Codec", "RawBytes", "BlockCodec", "Lz4Codec", "NoneCodec", "PlanesCodec", "ZstdCodec", "HEADER_SIZE",
           "RecordHeader", "make_codec", "checksum_parts", "decode_record", "open_record", "encode_record",
           "max_record_size", "parse_header", "read_header", "ALL_DECODERS", "codec_name"]

# The built-in codecs can decode any record they wrote, whatever the tier's current settings.
ALL_DECODERS: dict[int, Codec] = {c.codec_id: c for c in (NoneCodec(), Lz4Codec(), ZstdCodec(), PlanesCodec())}


def make_codec(cfg: CodecConfig, path: str = "codec") -> Codec:
    """The codec a tier's ``codec`` settings name; ConfigError naming ``path`` when they are invalid."""
    cls = CODECS.resolve(cfg.name, f"{path}.name")
    builtin = ALL_DECODERS.get(getattr(cls, "codec_id", -1))
    if builtin is not None and type(builtin) is not cls:
        raise ConfigError(f"{path}.name: {cfg.name!r} reuses codec id {cls.codec_id} of the built-in "
                          f"{builtin.name!r}; choose an unused id (4..255)")
    if cfg.shuffle and cls.splits_planes:
        raise ConfigError(f"{path}.shuffle: the {cfg.name!r} codec splits byte planes itself; remove shuffle")
    try:
        return cls.create(cfg.level)
    except CodecError as exc:
        raise ConfigError(f"{path}.level: {exc}") from None


def codec_name(codec_id: int) -> str:
    codec = ALL_DECODERS.get(codec_id)
    return codec.name if codec is not None else f"codec{codec_id}"


class BlockCodec:
    """A tier's codec settings bound together: raw block bytes <-> verified records."""

    def __init__(self, cfg: CodecConfig, checksum_alg: str = "xxh3", auth_key: bytes | None = None) -> None:
        self.cfg = cfg
        self.codec = make_codec(cfg)
        self.checksum_alg = checksum_alg
        self.auth_key = auth_key  # records are signed and must verify when set (never printed)
        self._decoders = {**ALL_DECODERS, self.codec.codec_id: self.codec}

    def __repr__(self) -> str:
        return f"BlockCodec({self.cfg!r}, {self.checksum_alg!r}, authenticated={self.auth_key is not None})"

    def encode(self, key: bytes, raw: bytes | memoryview) -> bytes:
        return encode_record(key, raw, self.codec, self.cfg.shuffle, self.checksum_alg, self.auth_key)

    def decode(self, key: bytes, record: bytes | memoryview, raw_size: int | None = None) -> RawBytes:
        """Raises CorruptBlockError unless ``record`` is exactly what ``encode(key, raw)`` produced (and ``raw``
        has ``raw_size`` bytes, when given)."""
        return decode_record(record, key, self._decoders, raw_size, self.auth_key)

    def open(self, key: bytes, record: bytes | memoryview,
             raw_size: int | None = None) -> tuple[RawBytes, RecordHeader]:
        """``decode`` without the final checksum: the caller checksums the bytes where it copied them."""
        return open_record(record, key, self._decoders, raw_size, self.auth_key)

    @property
    def copies_only(self) -> bool:
        """Opening a record is a header check, no decode: a hit's work is the copy and its checksum."""
        return isinstance(self.codec, NoneCodec) and not self.cfg.shuffle and self.auth_key is None

    def min_record_size(self, raw_size: int) -> int:
        """The fewest bytes a record of ``raw_size`` raw bytes can take (a compressing codec: the header)."""
        payload = raw_size if isinstance(self.codec, NoneCodec) else 0
        return HEADER_SIZE + payload + (MAC_SIZE if self.auth_key else 0)

    def same_format(self, other: BlockCodec) -> bool:
        return self.cfg == other.cfg and self.checksum_alg == other.checksum_alg and self.auth_key == other.auth_key
