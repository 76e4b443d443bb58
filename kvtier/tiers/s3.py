"""S3Tier: block records as objects in an S3-compatible bucket (AWS S3, SeaweedFS, MinIO, ...).

Object names carry hashes only: ``{prefix}/{hex[:2]}/{hex}`` where ``hex`` is the block key. Records are
whole objects, so a reader sees one writer's complete record or none (S3 PUT is atomic per object), and the
record's own checksum catches anything else. Credentials come from the tier config or the standard AWS chain
(environment, shared files, instance roles); they are never logged, and reprs and errors name only the
endpoint, bucket and prefix.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from kvtier.codecs import BlockCodec
from kvtier.errors import TierError
from kvtier.keys import BlockKey
from kvtier.policies.base import EvictionPolicy
from kvtier.tiers.base import StoredBlock
from kvtier.redact import redact_url, redacted_repr
from kvtier.schema import bounded
from kvtier.security import host_of, is_loopback
from kvtier.tiers.shared import TOO_LARGE, Fetched, FetchJob, SharedTier, parse_hex_key

log = logging.getLogger(__name__)
T = TypeVar("T")

_MISSING_KEY = {"NoSuchKey", "404", "NotFound"}
_MISSING_BUCKET = {"NoSuchBucket", "404", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden",
           "InvalidToken", "ExpiredToken"}
_CREDENTIAL_HINT = ("check the tier's 'access_key_id'/'secret_access_key' settings, or the AWS credential chain "
                    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/credentials)")


@dataclass(frozen=True, repr=False)
class S3Options:
    __repr__ = redacted_repr

    bucket: str = ""
    prefix: str = "kvtier"
    endpoint_url: str | None = field(default=None, metadata={"url": True})
    region: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False, metadata={"secret": True})
    max_concurrency: int = bounded(16, 1, 1024)
    connect_timeout_s: float = bounded(1.0, 0.001, 600)
    load_timeout_s: float = bounded(1.0, 0.001, 600)  # all a load waits for this tier, in total
    save_timeout_s: float = bounded(10.0, 0.001, 3600)  # per request of a background save (retried)
    retries: int = bounded(2, 0, 20)  # retries of a save request after the first try (loads never retry)
    create_bucket: bool = False


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def make_s3_client(options: S3Options, for_loads: bool = False) -> Any:
    """A boto3 S3 client configured from the tier options: loads get the short load timeout and no retries,
    saves (and listings) the save timeout and ``retries``."""
    timeout = options.load_timeout_s if for_loads else options.save_timeout_s
    config = Config(
        connect_timeout=min(options.connect_timeout_s, timeout),
        read_timeout=timeout,
        retries={"mode": "standard", "total_max_attempts": 1 if for_loads else options.retries + 1},
        max_pool_connections=max(1, options.max_concurrency),
        s3={"addressing_style": options.addressing_style},
        # Records carry their own checksum; skip the extra CRC the SDK would compute on every body.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session(
        aws_access_key_id=options.access_key_id or None,
        aws_secret_access_key=options.secret_access_key or None,
        region_name=options.region or None,
    )
    return session.client("s3", endpoint_url=options.endpoint_url or None, config=config)


class S3Tier(SharedTier):
    kind = "s3"
    Options = S3Options
    default_codec = "planes"

    def __init__(self, name: str, capacity: int, codec: BlockCodec, policy: EvictionPolicy,
                 options: S3Options) -> None:
        if not options.bucket:
            raise TierError(f"tier {name!r} (s3): no bucket configured (set the tier's 'bucket')")
        super().__init__(name, capacity, codec, policy, label=f"tier {name!r} (s3)",
                         max_concurrency=options.max_concurrency, load_timeout_s=options.load_timeout_s)
        self.options = options
        self.bucket = options.bucket
        self.prefix = options.prefix.strip("/")
        self.endpoint = redact_url(options.endpoint_url)
        try:
            self._client = make_s3_client(options)
            self._load_client = make_s3_client(options, for_loads=True)
        except (BotoCoreError, ValueError) as exc:
            raise TierError(f"{self.label}: cannot configure the S3 client for {self.endpoint}: "
                            f"{type(exc).__name__} (check 'endpoint_url', 'region', 'addressing_style')") from None
        try:
            self._check_bucket()
        except TierError:
            self.close()
            raise

    @classmethod
    def transport_warnings(cls, options: S3Options) -> list[str]:
        url = options.endpoint_url or "https://s3.amazonaws.com"  # boto3's default endpoints use TLS
        if url.lower().startswith("http://") and not is_loopback(host_of(url)):
            return [f"{redact_url(url)} is reached without TLS (http://): credentials and KV cross the network "
                    "in clear; use an https:// endpoint_url"]
        return []

    def __repr__(self) -> str:
        return (f"S3Tier(name={self.name!r}, endpoint={self.endpoint!r}, bucket={self.bucket!r}, "
                f"prefix={self.prefix!r}, capacity={self.capacity})")

    def object_name(self, key: BlockKey) -> str:
        hexkey = key.hex()
        return f"{self.prefix}/{hexkey[:2]}/{hexkey}" if self.prefix else f"{hexkey[:2]}/{hexkey}"

    # ---- start-up ---------------------------------------------------------------------------------
    def _check_bucket(self) -> None:
        where = f"bucket {self.bucket!r} at {self.endpoint}"
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            code = _error_code(exc)
            if code in _DENIED:
                raise TierError(f"{self.label}: access denied to {where} ({code}): {_CREDENTIAL_HINT}") from None
            if code not in _MISSING_BUCKET:
                raise TierError(f"{self.label}: cannot use {where}: {code} "
                                "(check 'bucket', 'region', 'endpoint_url')") from None
        except (NoCredentialsError, PartialCredentialsError):
            raise TierError(f"{self.label}: no usable S3 credentials for {where}: {_CREDENTIAL_HINT}") from None
        except (BotoConnectionError, HTTPClientError) as exc:
            raise TierError(f"{self.label}: cannot reach S3 endpoint {self.endpoint} ({type(exc).__name__}; "
                            "check 'endpoint_url' and that the server is running)") from None
        except BotoCoreError as exc:
            raise TierError(f"{self.label}: cannot use {where}: {type(exc).__name__} "
                            "(check 'endpoint_url', 'region')") from None
        if not self.options.create_bucket:
            raise TierError(f"{self.label}: bucket {self.bucket!r} does not exist at {self.endpoint} "
                            "(check the tier's 'bucket' setting, or set 'create_bucket: true')")
        self._create_bucket(where)

    def _create_bucket(self, where: str) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.options.region and self.options.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.options.region}
        try:
            self._client.create_bucket(**kwargs)
            log.info("%s: created %s", self.label, where)
        except ClientError as exc:
            code = _error_code(exc)
            if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return  # another instance created it first
            hint = _CREDENTIAL_HINT if code in _DENIED else "check 'bucket' (3-63 lowercase letters, digits, '-')"
            raise TierError(f"{self.label}: cannot create {where} ({code}): {hint} (create_bucket)") from None
        except BotoCoreError as exc:
            raise TierError(f"{self.label}: cannot create {where}: {type(exc).__name__}") from None

    # ---- the boundary: every backend call goes through here -----------------------------------------
    def _call(self, op: str, fn: Callable[[], T], may_probe: bool = True) -> T:
        self.breaker.check(may_probe)
        try:
            result = fn()
        except ClientError as exc:
            self.breaker.record_success()  # the server answered
            raise TierError(f"{self.label}: {op} failed: {_error_code(exc)}") from None
        except (BotoConnectionError, HTTPClientError) as exc:
            self.breaker.record_failure(f"{type(exc).__name__} talking to {self.endpoint}")
            raise TierError(f"{self.label}: {op} failed: {type(exc).__name__} ({self.endpoint})") from None
        except (NoCredentialsError, PartialCredentialsError):
            raise TierError(f"{self.label}: {op} failed: no usable credentials; {_CREDENTIAL_HINT}") from None
        except BotoCoreError as exc:
            raise TierError(f"{self.label}: {op} failed: {type(exc).__name__}") from None
        self.breaker.record_success()
        return result

    # ---- storage primitives ---------------------------------------------------------------------------
    def _write(self, key: BlockKey, record: bytes) -> None:
        name = self.object_name(key)
        self._call("put", lambda: self._client.put_object(Bucket=self.bucket, Key=name, Body=record))

    def _fetch_jobs(self, keys: Sequence[BlockKey]) -> list[FetchJob]:
        return [([i], lambda key=key: [self._fetch(key)]) for i, key in enumerate(keys)]  # type: ignore[misc]

    def _fetch(self, key: BlockKey) -> Fetched:
        name = self.object_name(key)
        limit = self.max_record_bytes

        def fetch() -> Fetched:
            try:
                response = self._load_client.get_object(Bucket=self.bucket, Key=name)
            except ClientError as exc:
                if _error_code(exc) in _MISSING_KEY:
                    return None
                raise
            expected = response.get("ContentLength")
            if limit is not None and (expected is None or expected > limit):
                response["Body"].close()  # refused unread: larger than any valid record here
                return TOO_LARGE
            body = response["Body"].read(limit + 1 if limit is not None else None)
            if (expected is not None and len(body) != expected) or (limit is not None and len(body) > limit):
                raise TierError(f"{self.label}: short or long read of {name}: {len(body)} of {expected} bytes")
            return bytes(body)

        return self._call("get", fetch, may_probe=False)

    def _probe(self) -> None:
        self._client.head_bucket(Bucket=self.bucket)

    def _discard(self, key: BlockKey) -> None:
        name = self.object_name(key)
        self._call("delete", lambda: self._client.delete_object(Bucket=self.bucket, Key=name))

    # ---- listing: objects are {prefix}/{hh}/{hash}; a wider scope lists {scope}.../{hh}/{hash} ----------
    def location(self, scope: str | None = None) -> str:
        return f"{self.endpoint}/{self.bucket}/" + (f"{self.prefix}/" if scope is None and self.prefix else scope or "")

    def entries(self, scope: str | None = None) -> Iterator[StoredBlock]:
        prefix = (f"{self.prefix}/" if self.prefix else "") if scope is None else scope
        request: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": 1000}
        now = time.time()
        while True:
            page = self._call("list", lambda: self._client.list_objects_v2(**request))
            for item in page.get("Contents", ()):
                block = self._block_of(item, now)
                if block is not None and (scope is not None or block.namespace == self.prefix):
                    yield block
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            request["ContinuationToken"] = token

    @staticmethod
    def _block_of(item: dict[str, Any], now: float) -> StoredBlock | None:
        name = str(item["Key"])
        rest, _, hexkey = name.rpartition("/")
        namespace, _, fan = rest.rpartition("/") if "/" in rest else ("", "", rest)
        key = parse_hex_key(hexkey)
        if key is None or fan != hexkey[:2]:
            return None
        modified = item.get("LastModified")
        age = max(0.0, now - modified.timestamp()) if modified is not None else None
        return StoredBlock(key, name, namespace, int(item["Size"]), age)

    def read_heads(self, blocks: Sequence[StoredBlock], size: int) -> list[bytes | None]:
        def head(block: StoredBlock) -> bytes | None:
            try:
                response = self._call("get", lambda: self._client.get_object(
                    Bucket=self.bucket, Key=block.name, Range=f"bytes=0-{size - 1}"))
                return bytes(response["Body"].read(size))
            except TierError:
                return None
        return list(self._executor().map(head, blocks))

    def remove(self, blocks: Sequence[StoredBlock]) -> None:
        with self._lock:
            for block in blocks:
                self._unaccount(block.key)
        for start in range(0, len(blocks), 1000):
            batch = {"Objects": [{"Key": b.name} for b in blocks[start:start + 1000]], "Quiet": True}
            result = self._call("delete", lambda: self._client.delete_objects(Bucket=self.bucket, Delete=batch))
            if result.get("Errors"):
                first = result["Errors"][0]
                raise TierError(f"{self.label}: {len(result['Errors'])} deletes failed, first: "
                                f"{first.get('Key')}: {first.get('Code')}")

    def close(self) -> None:
        super().close()
        self._client.close()
        if hasattr(self, "_load_client"):
            self._load_client.close()
