"""Codec ABC. A codec turns raw block bytes into a payload and back; it never sees keys or checksums."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

# Raw block bytes as codecs hand them back: a decoder may return a view of its payload (no copy) or a buffer
# it filled; either way read-only to the caller.
RawBytes = bytes | bytearray | memoryview


class Codec(ABC):
    """Contract (tests/test_codecs.py runs it against every codec):

    ``decode(encode(data), len(data)) == data`` for any bytes-like ``data``. ``codec_id`` (0..255) is stored in
    each record and must never change for a given codec, nor be shared with another codec. ``decode`` never
    produces more than ``raw_size`` bytes (it must bound its output by it, not trust the payload) and raises on
    malformed input; the record layer turns any exception into a corrupt record. Instances are thread-safe.
    Plug-in codecs are named ``package.module:ClassName`` in a tier's ``codec.name``.
    """

    codec_id: int
    name: str
    splits_planes: ClassVar[bool] = False  # True: the codec splits byte planes itself (config refuses shuffle)

    @classmethod
    def create(cls, level: int) -> Codec:
        """An instance for a tier's ``codec`` settings; codecs without levels ignore ``level``."""
        return cls()

    @abstractmethod
    def encode(self, data: bytes | memoryview) -> bytes | memoryview: ...  # may be a view of ``data``

    @abstractmethod
    def decode(self, payload: bytes | memoryview, raw_size: int) -> RawBytes: ...
