"""One exception tree for kvtier. Errors from redis, boto3 and the OS are mapped into it where they enter."""

from __future__ import annotations


class KVTierError(Exception):
    """Base of every error kvtier raises on purpose."""


class ConfigError(KVTierError, ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message starts with the key path."""


class CodecError(KVTierError):
    """A codec could not encode or decode a payload."""


class CorruptBlockError(KVTierError):
    """A stored block failed verification (magic, sizes, key or checksum). Treated as a miss by callers."""


class TierError(KVTierError):
    """A tier could not serve a request (server down, I/O error). Treated as a miss by callers.

    A put that evicted blocks before its own write failed carries them in ``victims`` (key, record) so the
    caller can still demote them: a failed write never loses what it pushed out.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.victims: list[tuple[bytes, bytes | None]] = []


class TierFullError(TierError):
    """A record cannot fit in a tier even after evicting everything evictable."""

