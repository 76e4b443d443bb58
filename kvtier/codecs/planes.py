"""PlanesCodec: ZSTD on the high-byte plane of 16-bit KV values, the low-byte plane stored as it is.

A bf16 value is 1 sign bit, 8 exponent bits and 7 mantissa bits. Its high byte (sign + 7 exponent bits) takes
few distinct values across a KV block and codes to 2-3 bits; its low byte (1 exponent bit + 7 mantissa bits)
is close to random: compressing it takes most of a codec's time and adds about 1% to the ratio.
This codec splits the record into the two byte planes (kvtier.codecs.shuffle.split16), compresses only the
high plane with ZSTD and merges the planes back with whole-array arithmetic.

32-bit values (float32 KV, e.g. vLLM's CPU build where the processor has no bf16) split so that the high plane
alternates a mantissa byte (bits 8-15, random) with the sign-and-exponent byte (bits 24-31). ZSTD gains
nothing on the first and decoded the mixed plane at 0.56 GB/s against 0.9 on a 16-bit one (2-core AVX2 host).
When a sample of the plane shows that pattern (``_alternates``), the codec compresses only the plane's odd
bytes and stores its even bytes raw (mode 2): the same ratio, and half the bytes through ZSTD.

The ZSTD settings are fixed, from measurements on KV of a trained and a random-weight model
(benchmarks/results/codecs.md): level 1 with a 2**10-entry match table. A small table finds fewer spurious
short matches in this plane, so it compresses as well or better and encodes and decodes faster than the level's
default table; levels 3 and 9 compressed the plane no better and encoded 2-12x slower. So a tier's
``codec.level`` is ignored (as for lz4), and the constructor's arguments exist for the benchmark's sweep.

Payload (little-endian): mode u8 | body length u32 | body | low plane (raw_size // 2 bytes) | the odd trailing
byte, if any. The body is the high plane: raw (mode 0), one ZSTD frame (mode 1), or its even bytes raw followed
by a ZSTD frame of its odd bytes (mode 2; raw_size a multiple of 4). Decoding checks every length against
``raw_size`` before anything is allocated, and a ZSTD frame must declare exactly the bytes it stands for.
The plane split is the codec's own: the record-level ``shuffle`` flag must stay off (config refuses it).
"""

from __future__ import annotations

import struct

import numpy as np

from kvtier.codecs.base import Codec
from kvtier.codecs.shuffle import merge16, split16
from kvtier.codecs.zstd import ZstdCodec
from kvtier.errors import CodecError

_HEAD = struct.Struct("<BI")
MODE_RAW, MODE_ZSTD, MODE_ZSTD_ODD = 0, 1, 2
_SAMPLE = 2048  # bytes of the high plane whose byte values choose mode 2 (~15 us)
_RANDOM, _SHARED = 192, 128  # distinct values among 1024 bytes: ~251 when random, a few dozen for exponents


def _distinct(sample: np.ndarray) -> int:
    return int(np.count_nonzero(np.bincount(sample, minlength=256)))


def _alternates(high: np.ndarray) -> bool:
    """True when the high plane's even bytes look random and its odd bytes do not: 32-bit values."""
    sample = high[:_SAMPLE]
    if len(high) % 2 or len(sample) < _SAMPLE:
        return False
    return _distinct(sample[0::2]) > _RANDOM and _distinct(sample[1::2]) < _SHARED


class PlanesCodec(Codec):
    codec_id = 3
    name = "planes"
    splits_planes = True

    def __init__(self, level: int = 1, hash_log: int | None = 10) -> None:
        self._zstd = ZstdCodec(level, hash_log)  # validates both; per-thread compressors

    def encode(self, data: bytes | memoryview) -> bytes:
        low, high, tail = (plane.data for plane in split16(data))
        body: list[bytes | memoryview] = [high]  # what ZSTD does not shrink stays raw
        mode = MODE_RAW
        if _alternates(np.frombuffer(high, np.uint8)):
            even, odd, _ = (plane.data for plane in split16(high))
            packed = self._zstd.encode(odd)
            if len(packed) < len(odd):
                mode, body = MODE_ZSTD_ODD, [even, packed]
        else:
            packed = self._zstd.encode(high)
            if len(packed) < len(high):
                mode, body = MODE_ZSTD, [packed]
        return b"".join((_HEAD.pack(mode, sum(map(len, body))), *body, low, tail))

    def decode(self, payload: bytes | memoryview, raw_size: int) -> memoryview:
        view = memoryview(payload).cast("B")
        if len(view) < _HEAD.size:
            raise CodecError(f"planes: payload of {len(view)} bytes is shorter than its header")
        mode, body_size = _HEAD.unpack_from(view)
        half, odd = divmod(raw_size, 2)
        if len(view) != _HEAD.size + body_size + half + odd:
            raise CodecError(f"planes: payload is {len(view)} bytes; {body_size} + {raw_size - half} "
                             f"+ {_HEAD.size} expected for {raw_size} raw bytes")
        body_end = _HEAD.size + body_size
        body = view[_HEAD.size:body_end]
        if mode == MODE_ZSTD:
            high: bytes | memoryview = self._zstd.decode(body, half)
        elif mode == MODE_RAW and body_size == half:
            high = body
        elif mode == MODE_ZSTD_ODD and half % 2 == 0 and body_size > half // 2:
            high = merge16(body[:half // 2], self._zstd.decode(body[half // 2:], half // 2), b"")
        else:
            raise CodecError(f"planes: bad mode {mode} with a high plane of {body_size} bytes")
        return merge16(view[body_end:body_end + half], high, view[body_end + half:])
