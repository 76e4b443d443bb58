"""Codec ABC. A codec turns raw block bytes into a payload and back; it never sees keys or checksums."""

from __future__ import annotations

from abc import ABC, abstractmethod


class Codec(ABC):
    """Contract: ``decode(encode(data), len(data)) == data`` for any bytes-like ``data``.

    ``codec_id`` is stored in each record and must never change for a given codec. ``decode`` raises
    CodecError on malformed input (never returns bytes of the wrong length).
    """

    codec_id: int
    name: str

    @abstractmethod
    def encode(self, data: bytes | memoryview) -> bytes: ...

    @abstractmethod
    def decode(self, payload: bytes | memoryview, raw_size: int) -> bytes: ...
