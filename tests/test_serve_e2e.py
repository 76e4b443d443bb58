"""`vllm serve` (the OpenAI server, module form) with the one-flag kvtier enablement on 127.0.0.1:
chat requests are answered, a repeated conversation is served from kvtier after vLLM's own prefix cache is
emptied, and kvtier's stats reach the server log."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from kvtier_bench.models import build_model

pytestmark = pytest.mark.e2e
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
         "near the old harbour where ships unload grain timber and copper for distant markets").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    model = build_model("tiny")
    work = tmp_path_factory.mktemp("serve")
    config = work / "kvtier.yaml"
    config.write_text(f"tiers:\n  - {{kind: dram, capacity: 128MiB}}\n"
                      f"  - {{kind: disk, capacity: 256MiB, path: {work / 'disk'}}}\n")
    port = free_port()
    transfer = {"kv_connector": "KVTierConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"config": str(config)}}
    log_path = work / "server.log"
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0-1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
             "--model", model, "--dtype", "bfloat16", "--max-model-len", "4096", "--enforce-eager",
             "--block-size", "128", "--enable-prompt-tokens-details", "--kv-transfer-config", json.dumps(transfer)],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-5000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(2)
        else:
            raise AssertionError(f"server did not start:\n{log_path.read_text()[-5000:]}")
        yield url, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def chat(url: str, messages: list[dict[str, str]]) -> dict:
    reply = requests.post(f"{url}/v1/chat/completions", timeout=300, json={
        "model": requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"],
        "messages": messages, "temperature": 0, "max_tokens": 16})
    reply.raise_for_status()
    return reply.json()


def test_chat_is_served_from_kvtier_after_prefix_cache_reset(server: tuple[str, Path]) -> None:
    url, log_path = server
    system = " ".join(WORDS[i % len(WORDS)] for i in range(700))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "tell me about the harbour"}]
    first = chat(url, messages)
    assert first["choices"][0]["message"]["content"] is not None
    # Empty vLLM's own prefix cache (not kvtier's): only kvtier can serve the repeat.
    time.sleep(1.0)
    for _ in range(20):
        if requests.post(f"{url}/reset_prefix_cache", timeout=30).json().get("success"):
            break
        time.sleep(0.5)
    second = chat(url, messages)
    cached = (second["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    prompt_tokens = second["usage"]["prompt_tokens"]
    assert cached == (prompt_tokens - 1) // 128 * 128 and cached > 0
    # The same request again is a resident vLLM prefix hit: the kvtier hit must give the same tokens.
    third = chat(url, messages)
    assert third["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
    assert second["choices"][0]["message"]["content"] == third["choices"][0]["message"]["content"]
    # A second turn extends the conversation and is answered too.
    messages += [first["choices"][0]["message"], {"role": "user", "content": "and the ships?"}]
    assert chat(url, messages)["choices"][0]["message"]["content"] is not None
    time.sleep(11)  # vLLM logs connector stats every 10 s
    chat(url, messages)
    text = log_path.read_text()
    assert "registered KV caches" in text
    assert "KV Transfer metrics" in text and "loaded_blocks" in text
