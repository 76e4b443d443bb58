"""Codec contract, shuffle filter and record verification: a damaged record never decodes to wrong bytes."""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
import zstandard

from kvtier.codecs import (
    ALL_DECODERS,
    BlockCodec,
    Lz4Codec,
    NoneCodec,
    PlanesCodec,
    ZstdCodec,
    decode_record,
    encode_record,
    make_codec,
)
from kvtier.codecs.planes import MODE_RAW, MODE_ZSTD, MODE_ZSTD_ODD
from kvtier.codecs.shuffle import merge16, shuffle16, split16, unshuffle16
from kvtier.config import CodecConfig, KVTierConfig
from kvtier.errors import CodecError, ConfigError, CorruptBlockError
from kvtier.plugins import CODECS as CODEC_REGISTRY

CODECS = [NoneCodec(), Lz4Codec(), ZstdCodec(1), ZstdCodec(9), ZstdCodec(1, hash_log=10), PlanesCodec(),
          PlanesCodec(3, None)]
SIZES = [0, 1, 2, 3, 5, 127, 128, 129, 4095, 4096, 4097, 65537]
KEY = bytes(range(16))


def ids(codec) -> str:
    return f"{codec.name}-{getattr(codec, 'level', '')}-{getattr(codec, 'hash_log', '')}"


def kv_like(n: int = 65536) -> bytes:
    """bf16-like values: similar exponents, noisy mantissas (what KV caches look like)."""
    rng = np.random.default_rng(0)
    return rng.normal(0, 1, n).astype(np.float32).view(np.uint32).__rshift__(16).astype(np.uint16).tobytes()


def kv_like32(n: int = 32768) -> bytes:
    """float32 values of similar magnitudes (KV of a model run in float32: vLLM's CPU build without bf16)."""
    return np.random.default_rng(1).normal(0, 1, n).astype(np.float32).tobytes()


def kv_bytes(n: int) -> bytes:
    """Exactly ``n`` bytes of kv_like data (odd lengths end in half a value)."""
    return kv_like(n // 2 + 1)[:n]


@pytest.mark.parametrize("codec", CODECS, ids=ids)
@pytest.mark.parametrize("data", [b"", b"x", os.urandom(4097), kv_like(), kv_like32()],
                         ids=["empty", "one", "random", "kv", "kv32"])
def test_codec_roundtrip(codec, data: bytes) -> None:
    assert codec.decode(codec.encode(data), len(data)) == data


@pytest.mark.parametrize("codec", CODECS, ids=ids)
@pytest.mark.parametrize("n", SIZES)
def test_codec_roundtrip_sizes_and_buffer_types(codec, n: int) -> None:
    for data in (kv_bytes(n), os.urandom(n), bytes(n)):
        payload = codec.encode(memoryview(data))
        assert codec.encode(bytearray(data)) == payload  # deterministic, whatever the buffer type
        out = codec.decode(memoryview(payload), n)
        assert len(out) == n and bytes(out) == data


@pytest.mark.parametrize("codec", [Lz4Codec(), ZstdCodec(3), NoneCodec(), PlanesCodec()], ids=lambda c: c.name)
def test_codec_rejects_wrong_size(codec) -> None:
    payload = codec.encode(kv_like(1024))
    for wrong in (7, 2047, 2049, 4096):
        with pytest.raises(CodecError):
            codec.decode(payload, wrong)


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


@pytest.mark.parametrize("cfg", [CodecConfig("none"), CodecConfig("lz4", shuffle=True), CodecConfig("zstd", 5, True),
                                 CodecConfig("planes")])
@pytest.mark.parametrize("alg", ["xxh3", "crc32"])
def test_record_roundtrip(cfg: CodecConfig, alg: str) -> None:
    data = kv_like(8192)
    codec = BlockCodec(cfg, alg)
    assert codec.decode(KEY, codec.encode(KEY, data)) == data


@pytest.mark.parametrize("codec,shuffle", [(Lz4Codec(), True), (PlanesCodec(), False)], ids=["lz4", "planes"])
def test_every_single_byte_flip_is_detected(codec, shuffle: bool) -> None:
    data = kv_like(512)
    record = encode_record(KEY, data, codec, shuffle=shuffle)
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


# ---- planes: format checks, forged payloads, bounded output ---------------------------------------------------

def test_planes_compresses_kv_and_stores_random_high_planes_raw() -> None:
    codec = PlanesCodec()
    data = kv_like()
    payload = codec.encode(data)
    assert payload[0] == MODE_ZSTD and len(data) / len(payload) > 1.3
    noise = os.urandom(8193)
    payload = codec.encode(noise)
    assert payload[0] == MODE_RAW and len(payload) == len(noise) + 5  # never expands by more than its header


def test_planes_codes_only_the_exponent_bytes_of_32_bit_values() -> None:
    """float32 KV: the high plane alternates random mantissa bytes with exponent bytes; only the latter go through
    ZSTD (mode 2), which compresses as well as the whole plane did (mode 1), with half the bytes to decode."""
    codec, data = PlanesCodec(), kv_like32()
    payload = codec.encode(data)
    assert payload[0] == MODE_ZSTD_ODD and codec.decode(payload, len(data)) == data
    whole = 5 + len(ZstdCodec(1, hash_log=10).encode(split16(data)[1])) + len(data) // 2
    assert len(payload) <= whole and len(data) / len(payload) > 1.15
    assert codec.encode(kv_like())[0] == MODE_ZSTD  # 16-bit values keep one frame for the whole plane
    for size in (len(data) - 2, len(data) - 1):  # not a whole number of 32-bit values: one frame or raw
        assert codec.encode(data[:size])[0] in (MODE_ZSTD, MODE_RAW)
        assert codec.decode(codec.encode(data[:size]), size) == data[:size]


def planes_payload(mode: int, high: bytes, low: bytes, tail: bytes = b"", size: int | None = None) -> bytes:
    size = len(high) if size is None else size
    return bytes([mode]) + size.to_bytes(4, "little") + high + low + tail


def test_planes_rejects_malformed_payloads() -> None:
    codec, data = PlanesCodec(), kv_bytes(4097)
    good = codec.encode(data)
    body_size = int.from_bytes(good[1:5], "little")
    frame, low, tail = good[5:5 + body_size], good[5 + body_size:-1], good[-1:]
    bad = [good[:-1], good + b"\0", good[:5], good[:4], b"", bytes(len(good)),
           planes_payload(3, frame, low, tail),                                    # unknown mode
           planes_payload(MODE_RAW, frame, low, tail),                             # raw, but not half the size
           planes_payload(MODE_ZSTD, frame, low, tail, body_size + 1),             # lengths that do not add up
           planes_payload(MODE_ZSTD, frame[:-1], low + b"\0", tail),               # truncated frame
           planes_payload(MODE_ZSTD, b"\0" * len(frame), low, tail),               # not a frame
           planes_payload(MODE_ZSTD, ZstdCodec(1).encode(data[1:4097:2] + b"x"), low, tail)]  # frame too long
    for payload in bad:
        with pytest.raises(CodecError):
            codec.decode(payload, len(data))
    for wrong in (len(data) - 1, len(data) + 1, 0):
        with pytest.raises(CodecError):
            codec.decode(good, wrong)


def test_planes_rejects_malformed_odd_byte_payloads() -> None:
    codec, data = PlanesCodec(), kv_like32(1024)
    good = codec.encode(data)
    assert good[0] == MODE_ZSTD_ODD
    quarter = len(data) // 4
    body_size = int.from_bytes(good[1:5], "little")
    even, frame, low = good[5:5 + quarter], good[5 + quarter:5 + body_size], good[5 + body_size:]
    odd = split16(split16(data)[1])[1].tobytes()
    bad = [planes_payload(MODE_ZSTD_ODD, even, low),                                   # no frame
           planes_payload(MODE_ZSTD_ODD, even[:-1], frame + low[:1], low[1:]),         # no room for the even bytes
           planes_payload(MODE_ZSTD_ODD, even, ZstdCodec(1).encode(odd + b"x"), low),  # frame one byte too long
           planes_payload(MODE_ZSTD_ODD, even, ZstdCodec(1).encode(odd[:-1]), low),    # one byte too short
           planes_payload(MODE_ZSTD_ODD, even, b"\0" * len(frame), low)]               # not a frame
    for payload in bad:
        with pytest.raises(CodecError):
            codec.decode(payload, len(data))
    with pytest.raises(CodecError, match="bad mode"):  # mode 2 needs whole 32-bit values (lengths add up here)
        codec.decode(planes_payload(MODE_ZSTD_ODD, even + frame, low[:-1]), len(data) - 2)


def test_planes_flipped_payload_never_decodes_to_another_length() -> None:
    codec, data = PlanesCodec(), kv_bytes(2049)
    payload = codec.encode(data)
    for i in range(len(payload)):
        damaged = bytearray(payload)
        damaged[i] ^= 0x10
        try:
            out = codec.decode(bytes(damaged), len(data))
        except CodecError:
            continue
        assert len(out) == len(data)  # a wrong value inside is the record checksum's to catch (test above)


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


@pytest.mark.parametrize("mode", [MODE_ZSTD, MODE_ZSTD_ODD])
def test_planes_decode_allocates_no_more_than_raw_size(mode: int) -> None:
    raw_size = 8192
    even = bytes(raw_size // 4) if mode == MODE_ZSTD_ODD else b""
    payload = planes_payload(mode, even + zstd_bomb(64 << 20), bytes(raw_size // 2))

    def decode() -> None:
        with pytest.raises(CodecError):
            PlanesCodec().decode(payload, raw_size)

    assert peak_bytes_while(decode) < 1 << 20


# ---- registration and config ---------------------------------------------------------------------------------

def test_planes_is_a_builtin_any_tier_decodes() -> None:
    assert CODEC_REGISTRY.resolve("planes", "codec.name") is PlanesCodec
    assert isinstance(ALL_DECODERS[PlanesCodec.codec_id], PlanesCodec)
    assert len({type(c).codec_id for c in ALL_DECODERS.values()}) == len(ALL_DECODERS) == 4
    record = BlockCodec(CodecConfig("planes")).encode(KEY, kv_like(4096))
    assert BlockCodec(CodecConfig("lz4")).decode(KEY, record) == kv_like(4096)  # another tier's settings


def test_planes_refuses_the_record_shuffle() -> None:
    with pytest.raises(ConfigError, match=r"codec\.shuffle"):
        make_codec(CodecConfig("planes", shuffle=True))
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.codec\.shuffle"):
        KVTierConfig.from_dict({"tiers": [{"kind": "dram", "capacity": "1MiB",
                                           "codec": {"name": "planes", "shuffle": True}}]})


def test_zstd_hash_log_is_validated() -> None:
    with pytest.raises(CodecError, match="hash_log"):
        ZstdCodec(1, hash_log=99)
