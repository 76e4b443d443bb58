from __future__ import annotations

from kvtier.codecs.base import Codec, RawBytes
from kvtier.errors import CodecError


class NoneCodec(Codec):
    codec_id = 0
    name = "none"

    def encode(self, data: bytes | memoryview) -> bytes | memoryview:
        """``data`` itself: the record layer copies it once, into the record."""
        return data

    def decode(self, payload: bytes | memoryview, raw_size: int) -> RawBytes:
        """The payload itself, not a copy: a record is immutable bytes, and a hit copies it into the KV cache
        once, straight from here."""
        if len(payload) != raw_size:
            raise CodecError(f"none: payload is {len(payload)} bytes, expected {raw_size}")
        return payload
