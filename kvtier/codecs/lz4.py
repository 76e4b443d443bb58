from __future__ import annotations

import lz4.block

from kvtier.codecs.base import Codec
from kvtier.errors import CodecError


class Lz4Codec(Codec):
    codec_id = 1
    name = "lz4"

    def encode(self, data: bytes | memoryview) -> bytes:
        return lz4.block.compress(data, store_size=False)

    def decode(self, payload: bytes | memoryview, raw_size: int) -> bytes:
        try:
            out = lz4.block.decompress(payload, uncompressed_size=raw_size)
        except lz4.block.LZ4BlockError as exc:
            raise CodecError(f"lz4: {exc}") from exc
        if len(out) != raw_size:
            raise CodecError(f"lz4: decoded {len(out)} bytes, expected {raw_size}")
        return out
