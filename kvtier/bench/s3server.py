"""A throw-away S3 server for the benchmark: SeaweedFS ``weed mini`` on 127.0.0.1, free ports, a temp dir.

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

_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


def find_weed() -> str | None:
    return os.environ.get("KVTIER_WEED") or shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalS3:
    def __init__(self, weed: str, workdir: Path) -> None:
        self.weed = weed
        self.workdir = workdir
        self.ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
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
        cmd = [self.weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
               *(f"-{flag}={port}" for flag, port in self.ports.items())]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        with open(self.workdir / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"weed mini did not start; see {self.workdir / 'weed.log'}")
            time.sleep(0.1)
        self._make_bucket(deadline)

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint_url + "/", timeout=0.5).close()
            return True
        except urllib.error.HTTPError:  # 403 for an unsigned request: it is up
            return True
        except OSError:
            return False

    def _make_bucket(self, deadline: float) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1", aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, config=Config(s3={"addressing_style": "path"}))
        error: Exception | None = None
        while time.monotonic() < deadline:
            try:  # volumes may come up a little after the S3 port: retry until an object can be written
                try:
                    client.create_bucket(Bucket=self.bucket)
                except client.exceptions.BucketAlreadyOwnedByYou:
                    pass
                client.put_object(Bucket=self.bucket, Key="probe", Body=b"ok")
                client.delete_object(Bucket=self.bucket, Key="probe")
                return
            except Exception as exc:  # noqa: BLE001 - retried, reported at the deadline
                error = exc
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"S3 bucket not usable: {error}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
