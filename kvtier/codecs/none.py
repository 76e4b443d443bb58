from __future__ import annotations

from kvtier.codecs.base import Codec
from kvtier.errors import CodecError


class NoneCodec(Codec):
    codec_id = 0
    name = "none"

    def encode(self, data: bytes | memoryview) -> bytes:
        return bytes(data)

    def decode(self, payload: bytes | memoryview, raw_size: int) -> bytes:
        if len(payload) != raw_size:
            raise CodecError(f"none: payload is {len(payload)} bytes, expected {raw_size}")
        return bytes(payload)
