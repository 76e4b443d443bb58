"""The on-storage block record: a fixed header, then the codec payload.

Header (little-endian, 56 bytes):
  magic "KVTB" | version u8 | codec_id u8 | flags u8 (bit0 = shuffle16) | checksum_alg u8
  raw_size u64 | payload_size u64 | checksum u64 (of the raw bytes) | key 16 bytes | header crc32 u32 | pad u32

``decode_record`` checks every field, the key the caller asked for and the checksum of the decoded bytes, so
a record that was truncated, flipped, overwritten with another block or with garbage raises
CorruptBlockError; it never returns wrong bytes.
"""

from __future__ import annotations

import struct
import zlib

import xxhash

from kvtier.codecs.base import Codec
from kvtier.codecs.shuffle import shuffle16, unshuffle16
from kvtier.errors import CodecError, CorruptBlockError

MAGIC = b"KVTB"
VERSION = 1
FLAG_SHUFFLE = 1
CHECKSUM_IDS = {"xxh3": 1, "crc32": 2}
_HEAD = struct.Struct("<4sBBBBQQQ16s")
_CRC = struct.Struct("<II")
HEADER_SIZE = _HEAD.size + _CRC.size


def checksum(data: bytes | memoryview, alg_id: int) -> int:
    if alg_id == 1:
        return xxhash.xxh3_64_intdigest(data)
    if alg_id == 2:
        return zlib.crc32(data)
    raise CorruptBlockError(f"unknown checksum algorithm id {alg_id}")


def encode_record(key: bytes, raw: bytes | memoryview, codec: Codec, shuffle: bool = False,
                  checksum_alg: str = "xxh3") -> bytes:
    alg_id = CHECKSUM_IDS[checksum_alg]
    body = shuffle16(raw) if shuffle else raw
    payload = codec.encode(body)
    head = _HEAD.pack(MAGIC, VERSION, codec.codec_id, FLAG_SHUFFLE if shuffle else 0, alg_id,
                      len(raw), len(payload), checksum(raw, alg_id), key)
    return b"".join((head, _CRC.pack(zlib.crc32(head), 0), payload))


def read_header(record: bytes | memoryview) -> tuple[int, int, int, int, int, int, bytes]:
    """Return (codec_id, flags, checksum_alg, raw_size, payload_size, checksum, key) after validating it."""
    if len(record) < HEADER_SIZE:
        raise CorruptBlockError(f"record of {len(record)} bytes is shorter than its header")
    head = bytes(record[:_HEAD.size])
    magic, version, codec_id, flags, alg, raw_size, payload_size, digest, key = _HEAD.unpack(head)
    crc, _ = _CRC.unpack_from(record, _HEAD.size)
    if magic != MAGIC or version != VERSION or crc != zlib.crc32(head):
        raise CorruptBlockError("record header is damaged (magic, version or header crc)")
    if len(record) != HEADER_SIZE + payload_size:
        raise CorruptBlockError(f"record is {len(record)} bytes, header says {HEADER_SIZE + payload_size}")
    return codec_id, flags, alg, raw_size, payload_size, digest, key


def decode_record(record: bytes | memoryview, key: bytes, codecs: dict[int, Codec]) -> bytes:
    codec_id, flags, alg, raw_size, _, digest, stored_key = read_header(record)
    if stored_key != key:
        raise CorruptBlockError("record belongs to a different key")
    codec = codecs.get(codec_id)
    if codec is None:
        raise CorruptBlockError(f"record uses unknown codec id {codec_id}")
    try:
        body = codec.decode(memoryview(record)[HEADER_SIZE:], raw_size)
    except CodecError as exc:
        raise CorruptBlockError(f"payload does not decode: {exc}") from exc
    raw = unshuffle16(body) if flags & FLAG_SHUFFLE else body
    if checksum(raw, alg) != digest:
        raise CorruptBlockError("checksum mismatch")
    return raw
