"""The on-storage block record: a fixed header, then the codec payload. This module owns the format.

Header (little-endian, 56 bytes):
  magic "KVTB" | version u8 | codec_id u8 | flags u8 (bit0 = shuffle16) | checksum_alg u8
  raw_size u64 | payload_size u64 | checksum u64 (of the raw bytes) | key 16 bytes | header crc32 u32 | pad u32

With flags bit1 (authenticated) a 32-byte keyed BLAKE2b MAC of header and payload follows the payload. The
checksum catches accidents; only the MAC stops a writer without the key from planting KV: a tier with a key
signs every record and refuses any record whose MAC is missing or wrong.

``decode_record`` checks every field, the key the caller asked for, the raw size the caller expects (before
anything is allocated), the MAC when it holds a key, and the checksum of the decoded bytes, so a record that
was truncated, flipped, overwritten with another block, forged or garbage raises CorruptBlockError; it never
returns wrong bytes and never lets a codec's own exception through. ``parse_header`` reads a header without
the payload (inspect, gc, size checks before a read). ``open_record`` stops short of the checksum, for a
caller that copies the bytes to where they are used and checksums what landed there (``checksum_parts``).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import xxhash

from kvtier.codecs.base import Codec, RawBytes
from kvtier.codecs.shuffle import shuffle16, unshuffle16
from kvtier.errors import CorruptBlockError

MAGIC = b"KVTB"
VERSION = 1
FLAG_SHUFFLE = 1
FLAG_MAC = 2
MAC_SIZE = 32
CHECKSUM_IDS = {"xxh3": 1, "crc32": 2}
_HEAD = struct.Struct("<4sBBBBQQQ16s")
_CRC = struct.Struct("<II")
HEADER_SIZE = _HEAD.size + _CRC.size


@dataclass(frozen=True)
class RecordHeader:
    codec_id: int
    flags: int
    checksum_alg: int
    raw_size: int
    payload_size: int
    checksum: int
    key: bytes

    @property
    def shuffled(self) -> bool:
        return bool(self.flags & FLAG_SHUFFLE)

    @property
    def signed(self) -> bool:
        return bool(self.flags & FLAG_MAC)


def record_mac(auth_key: bytes, head: bytes | memoryview, payload: bytes | memoryview) -> bytes:
    mac = hashlib.blake2b(key=auth_key, digest_size=MAC_SIZE, person=b"kvtier-record")
    mac.update(head)
    mac.update(payload)
    return mac.digest()


def checksum(data: bytes | memoryview, alg_id: int) -> int:
    if alg_id == 1:
        return xxhash.xxh3_64_intdigest(data)
    if alg_id == 2:
        return zlib.crc32(data)
    raise CorruptBlockError(f"unknown checksum algorithm id {alg_id}")


def checksum_parts(parts: Iterable[Any], alg_id: int) -> int:
    """``checksum`` of the concatenation of ``parts`` (contiguous buffers, e.g. numpy rows), without joining them."""
    if alg_id == 1:
        state = xxhash.xxh3_64()
        for part in parts:
            state.update(part)
        return state.intdigest()
    if alg_id == 2:
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)
        return crc
    raise CorruptBlockError(f"unknown checksum algorithm id {alg_id}")


def max_record_size(raw_size: int) -> int:
    """An upper bound on the size of any valid record of ``raw_size`` raw bytes (codecs may expand a little)."""
    return HEADER_SIZE + raw_size + raw_size // 64 + 1024 + MAC_SIZE


def encode_record(key: bytes, raw: bytes | memoryview, codec: Codec, shuffle: bool = False,
                  checksum_alg: str = "xxh3", auth_key: bytes | None = None) -> bytes:
    alg_id = CHECKSUM_IDS[checksum_alg]
    body = shuffle16(raw) if shuffle else raw
    payload = codec.encode(body)
    flags = (FLAG_SHUFFLE if shuffle else 0) | (FLAG_MAC if auth_key else 0)
    head = _HEAD.pack(MAGIC, VERSION, codec.codec_id, flags, alg_id, len(raw), len(payload), checksum(raw, alg_id), key)
    head += _CRC.pack(zlib.crc32(head), 0)
    if not auth_key:
        return b"".join((head, payload))
    return b"".join((head, payload, record_mac(auth_key, head, payload)))


def parse_header(head: bytes | memoryview, total_size: int) -> RecordHeader:
    """The header of a record of ``total_size`` bytes from its first HEADER_SIZE bytes (payload not needed)."""
    if total_size < HEADER_SIZE or len(head) < HEADER_SIZE:
        raise CorruptBlockError(f"record of {total_size} bytes is shorter than its header")
    packed = bytes(head[:_HEAD.size])
    magic, version, codec_id, flags, alg, raw_size, payload_size, digest, key = _HEAD.unpack(packed)
    crc, _ = _CRC.unpack_from(head, _HEAD.size)
    if magic != MAGIC or version != VERSION or crc != zlib.crc32(packed):
        raise CorruptBlockError("record header is damaged (magic, version or header crc)")
    expected = HEADER_SIZE + payload_size + (MAC_SIZE if flags & FLAG_MAC else 0)
    if total_size != expected:
        raise CorruptBlockError(f"record is {total_size} bytes, header says {expected}")
    return RecordHeader(codec_id, flags, alg, raw_size, payload_size, digest, key)


def read_header(record: bytes | memoryview) -> RecordHeader:
    return parse_header(record, len(record))


def decode_record(record: bytes | memoryview, key: bytes, codecs: Mapping[int, Codec],
                  raw_size: int | None = None, auth_key: bytes | None = None) -> RawBytes:
    """The verified raw bytes of ``record`` (possibly a view into it: copy before ``record`` changes);
    ``raw_size`` (when given) is the only size accepted. With an
    ``auth_key`` the record must carry a valid MAC."""
    raw, head = open_record(record, key, codecs, raw_size, auth_key)
    if checksum(raw, head.checksum_alg) != head.checksum:
        raise CorruptBlockError("checksum mismatch")
    return raw


def open_record(record: bytes | memoryview, key: bytes, codecs: Mapping[int, Codec],
                raw_size: int | None = None, auth_key: bytes | None = None) -> tuple[RawBytes, RecordHeader]:
    """``decode_record`` but the last check: the raw bytes, NOT yet verified, and the header whose checksum they
    must match. For callers that copy the bytes first and checksum what landed (``checksum_parts``)."""
    head = read_header(record)
    if head.key != key:
        raise CorruptBlockError("record belongs to a different key")
    if auth_key is not None:
        if not head.signed:
            raise CorruptBlockError("record is not authenticated (this tier requires a MAC)")
        end = HEADER_SIZE + head.payload_size
        view = memoryview(record)
        if not hmac.compare_digest(record_mac(auth_key, view[:HEADER_SIZE], view[HEADER_SIZE:end]), view[end:]):
            raise CorruptBlockError("record authentication failed (MAC mismatch)")
    if raw_size is not None and head.raw_size != raw_size:
        raise CorruptBlockError(f"record claims {head.raw_size} raw bytes, a block here has {raw_size}")
    if head.payload_size > max_record_size(head.raw_size) - HEADER_SIZE:
        raise CorruptBlockError(f"payload of {head.payload_size} bytes is too large for {head.raw_size} raw bytes")
    codec = codecs.get(head.codec_id)
    if codec is None:
        raise CorruptBlockError(f"record uses unknown codec id {head.codec_id}")
    try:
        body = codec.decode(memoryview(record)[HEADER_SIZE:HEADER_SIZE + head.payload_size], head.raw_size)
    except Exception as exc:  # any codec (built-in or plug-in) failing on hostile bytes is a corrupt record
        raise CorruptBlockError(f"payload does not decode: {type(exc).__name__}: {exc}") from exc
    if len(body) != head.raw_size:
        raise CorruptBlockError(f"payload decoded to {len(body)} bytes, header says {head.raw_size}")
    return (unshuffle16(body) if head.shuffled else body), head
