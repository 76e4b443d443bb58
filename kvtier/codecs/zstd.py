from __future__ import annotations

import threading

import zstandard

from kvtier.codecs.base import Codec
from kvtier.errors import CodecError


class ZstdCodec(Codec):
    """ZSTD at a configurable level (1..22). Compressor objects are per thread: they are not thread-safe.

    ``hash_log`` (not a config key; PlanesCodec sets it) overrides the level's match-finder table size: a small
    table finds fewer, longer matches, which on KV's exponent plane compresses better and faster.
    """

    codec_id = 2
    name = "zstd"

    @classmethod
    def create(cls, level: int) -> ZstdCodec:
        return cls(level)

    def __init__(self, level: int = 3, hash_log: int | None = None) -> None:
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 22:
            raise CodecError(f"zstd: level must be 1..22, got {level}")
        if hash_log is not None and not zstandard.HASHLOG_MIN <= hash_log <= zstandard.HASHLOG_MAX:
            raise CodecError(f"zstd: hash_log must be {zstandard.HASHLOG_MIN}..{zstandard.HASHLOG_MAX}, "
                             f"got {hash_log}")
        self.level = level
        self.hash_log = hash_log
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        if self.hash_log is None:
            return zstandard.ZstdCompressor(level=self.level)
        params = zstandard.ZstdCompressionParameters.from_level(self.level, hash_log=self.hash_log)
        return zstandard.ZstdCompressor(compression_params=params)

    def _pair(self) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        pair = getattr(self._local, "pair", None)
        if pair is None:
            pair = (self._compressor(), zstandard.ZstdDecompressor())
            self._local.pair = pair
        return pair

    def encode(self, data: bytes | memoryview) -> bytes:
        return self._pair()[0].compress(data)

    def decode(self, payload: bytes | memoryview, raw_size: int) -> bytes:
        try:
            # decompress() sizes its output by the size a frame declares and ignores max_output_size then:
            # a forged header could make it allocate far more than raw_size. Only frames of raw_size (or of
            # unknown size, bounded by max_output_size) are decoded.
            declared = zstandard.frame_content_size(payload)
            if declared not in (raw_size, zstandard.CONTENTSIZE_UNKNOWN):
                raise CodecError(f"zstd: frame declares {declared} bytes, expected {raw_size}")
            out = self._pair()[1].decompress(payload, max_output_size=raw_size)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd: {exc}") from exc
        if len(out) != raw_size:
            raise CodecError(f"zstd: decoded {len(out)} bytes, expected {raw_size}")
        return out
