"""HTTP client for an OpenAI-compatible vLLM server: streamed completions with token ids, /tokenize, /metrics.

Standard library only (``http.client``), so the benchmark client needs neither vLLM nor an HTTP package. Each
thread keeps one kept-alive connection; a request on a connection the server has meanwhile closed is sent once
more on a new one. The API key (if any) goes only into the ``Authorization`` header: it is never logged,
printed or written into a result.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kvtier.errors import ConfigError, KVTierError


class EndpointError(KVTierError):
    """The server refused a request, answered something unexpected, or could not be reached."""


@dataclass(frozen=True)
class EndpointURL:
    scheme: str
    host: str
    port: int
    prefix: str  # path before /v1, /metrics, ... ("" for a server at the root)

    @property
    def label(self) -> str:
        """The URL as the report shows it (never carries credentials: parse_endpoint refuses those)."""
        return f"{self.scheme}://{self.host}:{self.port}{self.prefix}"


def parse_endpoint(url: str) -> EndpointURL:
    """``http(s)://host[:port][/path]``; a trailing ``/v1`` is dropped (the server's routes hang off its root)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("--endpoint: expected http://host[:port] or https://host[:port][/path]")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError("--endpoint: the URL may not carry credentials, a query or a fragment "
                          "(pass an API key with --api-key-env VAR)")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError("--endpoint: the port is not a number in 1..65535") from None
    prefix = parts.path.rstrip("/")
    if prefix.endswith("/v1"):
        prefix = prefix[:-3]
    return EndpointURL(parts.scheme, parts.hostname, port, prefix)


@dataclass
class StreamResult:
    output: list[int]                 # generated token ids, in order
    token_s: list[float]              # arrival time of each token's chunk, seconds from the caller's t0
    usage: dict[str, Any]             # the final usage chunk ({} if the server sent none)
    prompt_token_ids: list[int] | None
    finish_reason: str | None


class Endpoint:
    """One server; safe to use from many threads (one connection per thread)."""

    def __init__(self, url: EndpointURL, api_key: str | None, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[http.client.HTTPConnection] = []

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self.url.scheme == "https" else http.client.HTTPConnection
            conn = cls(self.url.host, self.url.port, timeout=self.timeout_s)
            self._local.conn = conn
            with self._lock:
                self._open.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def close(self) -> None:
        with self._lock:
            for conn in self._open:
                conn.close()
            self._open.clear()

    def request(self, method: str, path: str, payload: Any = None) -> http.client.HTTPResponse:
        body = None if payload is None else json.dumps(payload).encode()
        for attempt in range(2):
            conn = self._connection()
            try:
                conn.request(method, self.url.prefix + path, body=body, headers=self._headers)
                return conn.getresponse()
            except ConnectionError as exc:  # a kept-alive connection the server had closed: once more, anew
                self._drop()
                if attempt:
                    raise EndpointError(f"{method} {self.url.label}{path}: {exc}") from None
            except OSError as exc:
                self._drop()
                raise EndpointError(f"{method} {self.url.label}{path}: {exc}") from None
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, payload: Any = None) -> tuple[int, bytes]:
        """Status and body of a plain (non-streamed) request."""
        resp = self.request(method, path, payload)
        try:
            return resp.status, resp.read()
        except OSError as exc:
            self._drop()
            raise EndpointError(f"{method} {self.url.label}{path}: {exc}") from None

    def get_json(self, path: str) -> Any:
        status, body = self.call("GET", path)
        if status != 200:
            raise EndpointError(f"GET {self.url.label}{path}: HTTP {status}: {body[:300]!r}")
        return json.loads(body)

    def stream_completion(self, payload: dict[str, Any], t0: float) -> StreamResult:
        """POST /v1/completions with ``stream: true``; every chunk's token ids get the chunk's arrival time."""
        resp = self.request("POST", "/v1/completions", {**payload, "stream": True})
        if resp.status != 200:
            raise EndpointError(f"POST {self.url.label}/v1/completions: HTTP {resp.status}: {resp.read()[:500]!r}")
        result = StreamResult([], [], {}, None, None)
        try:
            while line := resp.readline():
                if line.startswith(b"data: ") and line[6:].strip() != b"[DONE]":
                    _take_chunk(json.loads(line[6:]), time.perf_counter() - t0, result)
        except (OSError, ValueError) as exc:
            self._drop()
            raise EndpointError(f"POST {self.url.label}/v1/completions: broken stream: {exc}") from None
        return result


def _take_chunk(chunk: dict[str, Any], stamp: float, result: StreamResult) -> None:
    if "error" in chunk:
        raise EndpointError(f"the server reported an error mid-stream: {str(chunk['error'])[:300]}")
    for choice in chunk.get("choices") or []:
        ids = choice.get("token_ids")
        if ids is None and choice.get("text"):
            raise EndpointError("the server streamed text without token ids: it does not support "
                                "`return_token_ids` (vLLM >= 0.10.2 does)")
        result.output += ids or []
        result.token_s += [stamp] * len(ids or [])
        if choice.get("prompt_token_ids") is not None:
            result.prompt_token_ids = list(choice["prompt_token_ids"])
        result.finish_reason = choice.get("finish_reason") or result.finish_reason
    if chunk.get("usage"):
        result.usage = chunk["usage"]


class RemoteTokenizer:
    """``encode`` through the server's /tokenize: the prompts are built with the tokenizer the server uses."""

    def __init__(self, endpoint: Endpoint, model: str) -> None:
        self.endpoint = endpoint
        self.model = model
        self._cache: dict[tuple[str, bool], list[int]] = {}  # the chat template's short pieces recur

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        key = (text, add_special_tokens)
        if key in self._cache:
            return list(self._cache[key])
        status, body = self.endpoint.call("POST", "/tokenize", {"model": self.model, "prompt": text,
                                                                "add_special_tokens": add_special_tokens})
        data = json.loads(body) if status == 200 else {}
        if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
            raise EndpointError(f"POST {self.endpoint.url.label}/tokenize: HTTP {status}: {body[:200]!r}; "
                                "pass --tokenizer DIR (a local copy of the served model's tokenizer)")
        if len(text) <= 64:
            self._cache[key] = list(data["tokens"])
        return list(data["tokens"])
