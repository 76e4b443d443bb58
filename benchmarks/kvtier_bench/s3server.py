"""A throw-away S3 server for the benchmark: SeaweedFS ``weed mini`` on 127.0.0.1, free ports, a temp dir.
The start-up pieces (command, environment, readiness, bucket) are shared with the tests' server fixture.

``weed mini`` runs master, volume, filer and S3 gateway in one process; the admin identity's credentials are
taken from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in its environment, so requests must be signed with them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


def find_weed() -> str | None:
    return os.environ.get("KVTIER_WEED") or shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free a moment ago (held together so they differ)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_command(weed: str, data_dir: Path, ports: dict[str, int]) -> list[str]:
    """``weed mini`` (master, volume, filer and S3 gateway in one process) on 127.0.0.1 and the given ports."""
    return [weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            *(f"-{flag}={port}" for flag, port in ports.items())]


def weed_env(access_key: str, secret_key: str) -> dict[str, str]:
    """The environment for ``weed mini``: it turns these into its admin identity's credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    env.update(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
    return env


def s3_answers(endpoint_url: str) -> bool:
    try:
        urllib.request.urlopen(endpoint_url + "/", timeout=0.5).close()
        return True
    except urllib.error.HTTPError:  # any S3 answer (403 for an unsigned request) means it is up
        return True
    except OSError:
        return False


def s3_client(endpoint_url: str, access_key: str, secret_key: str, **config: Any) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name="us-east-1", aws_access_key_id=access_key,
        aws_secret_access_key=secret_key, config=Config(s3={"addressing_style": "path"}, **config))


def ensure_bucket(client: Any, bucket: str, timeout_s: float) -> None:
    """Create ``bucket`` and wait until an object can be written to it (volumes may lag the S3 port)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            try:
                client.create_bucket(Bucket=bucket)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
            client.put_object(Bucket=bucket, Key="_probe", Body=b"ok")
            client.delete_object(Bucket=bucket, Key="_probe")
            return
        except Exception as exc:  # noqa: BLE001 - retried until the deadline, then reported
            last = exc
            time.sleep(0.2)
    raise RuntimeError(f"bucket {bucket!r} not usable after {timeout_s:.0f} s: {last}")


class LocalS3:
    def __init__(self, weed: str, workdir: Path) -> None:
        self.weed = weed
        self.workdir = workdir
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        self.access_key = "kvtier-bench"
        self.secret_key = secrets.token_hex(16)
        self.bucket = "kvtier-bench"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def info(self, prefix: str) -> dict[str, str]:
        return {"endpoint_url": self.endpoint_url, "bucket": self.bucket, "prefix": prefix,
                "access_key": self.access_key, "secret_key": self.secret_key}

    def start(self, timeout_s: float = 60.0) -> None:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(weed_command(self.weed, data, self.ports),
                                         env=weed_env(self.access_key, self.secret_key), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not s3_answers(self.endpoint_url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"weed mini did not start; see {self.workdir / 'weed.log'}")
            time.sleep(0.1)
        try:
            ensure_bucket(s3_client(self.endpoint_url, self.access_key, self.secret_key), self.bucket,
                          max(1.0, deadline - time.monotonic()))
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
