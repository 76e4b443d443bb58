"""Codec contract, shuffle filter and record verification: a damaged record never decodes to wrong bytes."""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
import zstandard

from kvtier.codecs import ALL_DECODERS, BlockCodec, Lz4Codec, NoneCodec, ZstdCodec, decode_record, encode_record
from kvtier.codecs.shuffle import merge16, shuffle16, split16, unshuffle16
from kvtier.config import CodecConfig
from kvtier.errors import CodecError, CorruptBlockError

CODECS = [NoneCodec(), Lz4Codec(), ZstdCodec(1), ZstdCodec(9)]
SIZES = [0, 1, 2, 3, 5, 127, 128, 129, 4095, 4096, 4097, 65537]
KEY = bytes(range(16))


def kv_like(n: int = 65536) -> bytes:
    """bf16-like values: similar exponents, noisy mantissas (what KV caches look like)."""
    rng = np.random.default_rng(0)
    return rng.normal(0, 1, n).astype(np.float32).view(np.uint32).__rshift__(16).astype(np.uint16).tobytes()


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.name}")
@pytest.mark.parametrize("data", [b"", b"x", os.urandom(4097), kv_like()], ids=["empty", "one", "random", "kv"])
def test_codec_roundtrip(codec, data: bytes) -> None:
    assert codec.decode(codec.encode(data), len(data)) == data


@pytest.mark.parametrize("codec", [Lz4Codec(), ZstdCodec(3), NoneCodec()], ids=lambda c: c.name)
def test_codec_rejects_wrong_size(codec) -> None:
    payload = codec.encode(kv_like(1024))
    with pytest.raises(CodecError):
        codec.decode(payload, 7)


@pytest.mark.parametrize("data", [b"", b"abc", kv_like(1001) + b"z"])
def test_shuffle_roundtrip(data: bytes) -> None:
    assert unshuffle16(shuffle16(data)) == data


@pytest.mark.parametrize("n", SIZES)
def test_split_and_shuffle_are_the_byte_planes(n: int) -> None:
    data = os.urandom(n)
    even = n - n % 2
    low, high, tail = split16(data)
    assert (low.tobytes(), high.tobytes(), tail.tobytes()) == (data[0:even:2], data[1:even:2], data[even:])
    assert bytes(shuffle16(data)) == data[0:even:2] + data[1:even:2] + data[even:]  # the on-storage format
    assert bytes(merge16(low, high, tail)) == data
    assert unshuffle16(memoryview(bytearray(shuffle16(data)))) == data


def test_merge_rejects_planes_that_do_not_pair() -> None:
    with pytest.raises(ValueError):
        merge16(b"ab", b"abc", b"")
    with pytest.raises(ValueError):
        merge16(b"ab", b"ab", b"xy")


def test_shuffle_helps_on_kv_like_data() -> None:
    data = kv_like()
    plain = len(Lz4Codec().encode(data))
    shuffled = len(Lz4Codec().encode(shuffle16(data)))
    assert shuffled < plain


@pytest.mark.parametrize("cfg", [CodecConfig("none"), CodecConfig("lz4", shuffle=True), CodecConfig("zstd", 5, True)])
@pytest.mark.parametrize("alg", ["xxh3", "crc32"])
def test_record_roundtrip(cfg: CodecConfig, alg: str) -> None:
    data = kv_like(8192)
    codec = BlockCodec(cfg, alg)
    assert codec.decode(KEY, codec.encode(KEY, data)) == data


def test_every_single_byte_flip_is_detected() -> None:
    data = kv_like(512)
    record = encode_record(KEY, data, Lz4Codec(), shuffle=True)
    for i in range(len(record)):
        damaged = bytearray(record)
        damaged[i] ^= 0x40
        try:
            out = decode_record(bytes(damaged), KEY, ALL_DECODERS)
        except CorruptBlockError:
            continue
        assert out == data, f"flip at byte {i} decoded to wrong bytes"


def test_truncated_wrong_key_and_garbage_are_misses() -> None:
    data = kv_like(1024)
    record = encode_record(KEY, data, ZstdCodec(3))
    for bad in (record[:-1], record[:10], b"", os.urandom(len(record)), record + b"\0"):
        with pytest.raises(CorruptBlockError):
            decode_record(bad, KEY, ALL_DECODERS)
    with pytest.raises(CorruptBlockError, match="different key"):
        decode_record(record, bytes(16), ALL_DECODERS)


def test_zstd_level_is_validated() -> None:
    with pytest.raises(CodecError, match="level"):
        ZstdCodec(0)


def zstd_bomb(size: int, with_size: bool = True) -> bytes:
    """A ~1 KB ZSTD frame that inflates to ``size`` zero bytes (declaring that size in its header or not)."""
    return zstandard.ZstdCompressor(level=1, write_content_size=with_size).compress(bytes(size))


def peak_bytes_while(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("with_size", [True, False], ids=["declared", "undeclared"])
def test_zstd_decode_allocates_no_more_than_raw_size(with_size: bool) -> None:
    """zstandard's decompress() sizes its output by the frame header, not by max_output_size: a forged
    header must be refused before anything that size is allocated."""
    bomb = zstd_bomb(64 << 20, with_size)
    assert len(bomb) < 64 << 10

    def decode() -> None:
        with pytest.raises(CodecError):
            ZstdCodec().decode(bomb, 4096)

    assert peak_bytes_while(decode) < 1 << 20
