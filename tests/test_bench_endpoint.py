"""``kvtier bench --endpoint URL`` against a real ``vllm serve`` (CPU build) with kvtier, on 127.0.0.1.

One server for the module: the tiny model, kvtier with a DRAM tier, per-request cached tokens
(--enable-prompt-tokens-details), /reset_prefix_cache (VLLM_SERVER_DEV_MODE=1), an API key, and a KV space
of 8 blocks (2 MiB) so that one conversation's history pushes the other's out of vLLM's own cache. Three
benchmark runs against it, 2 conversations x 2 turns each: without the key (refused), with ``--reset vllm``
for 2 rounds (the second round is served by kvtier), then with the default ``--reset all`` (starts cold).
Plus fast tests of the URL rules and the /metrics reader.
"""

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

from kvtier_bench.endpoint import metrics
from kvtier_bench.endpoint.cli import api_key
from kvtier_bench.endpoint.client import parse_endpoint
from kvtier_bench.models import build_model
from kvtier_bench.runner import cpu_list
from kvtier_bench.settings import load_settings
from kvtier_bench.workload import generate, load_tokenizer
from kvtier.errors import ConfigError

API_KEY = "kvtier-endpoint-test-key-7f3a9c"
BAD_KEY = "not-the-key-41d2"
KEY_ENV = "KVTIER_ENDPOINT_TEST_KEY"
SETTINGS = "preset: quick\nworkload: {conversations: 2, turns: 2, answer_tokens: 32}\ntimeout_s: 300\n"


# ---- fast tests ------------------------------------------------------------------------------------------

def test_endpoint_url_rules() -> None:
    url = parse_endpoint("http://127.0.0.1:8000/v1/")
    assert (url.label, url.prefix) == ("http://127.0.0.1:8000", "")
    assert parse_endpoint("https://gw.example/vllm").label == "https://gw.example:443/vllm"
    for bad in ("http://user:pw@127.0.0.1:8000", "http://127.0.0.1:8000/?key=x", "ftp://host", "127.0.0.1:8000"):
        with pytest.raises(ConfigError) as err:
            parse_endpoint(bad)
        assert "pw" not in str(err.value) and "key=x" not in str(err.value)



def test_api_key_comes_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVTIER_TEST_UNSET_KEY", raising=False)
    with pytest.raises(ConfigError, match="KVTIER_TEST_UNSET_KEY is not set"):
        api_key("KVTIER_TEST_UNSET_KEY")
    monkeypatch.setenv("KVTIER_TEST_UNSET_KEY", "k")
    assert api_key("KVTIER_TEST_UNSET_KEY") == "k" and api_key(None) is None


METRICS_TEXT = """\
# HELP kvtier_tier_loaded_blocks_total Blocks loaded
# TYPE kvtier_tier_loaded_blocks_total counter
kvtier_tier_loaded_blocks_total{engine="0",model_name="m",tier="dram"} 4.0
kvtier_tier_loaded_blocks_total{engine="1",model_name="m",tier="dram"} 2.0
kvtier_tier_loaded_blocks_total{engine="0",model_name="m",tier="disk"} 1.0
kvtier_loaded_blocks_total{engine="0",model_name="m"} 7.0
kvtier_loaded_bytes_total{engine="0",model_name="m"} 1.835008e+06
kvtier_tier_hits_total{engine="0",model_name="m",tier="dram"} 6.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 256.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_cache_hit"} 256.0
vllm:cache_config_info{block_size="128",engine="0",note="a \\"quoted\\" label"} 1.0
"""


def test_metrics_reader_maps_kvtier_counters_to_the_stats_file_shape() -> None:
    samples = metrics.parse(METRICS_TEXT)
    stats = metrics.kvtier_stats(samples)
    assert stats["counters"]["loaded_blocks.dram"] == 6 and stats["counters"]["loaded_blocks.disk"] == 1
    assert stats["counters"]["loaded_blocks"] == 7 and stats["counters"]["loaded_bytes"] == 1835008
    assert stats["tiers"] == {"dram": {"hits": 6}}
    assert metrics.block_size(samples) == 128
    assert metrics.vllm_counters(samples) == {"vllm:prefix_cache_hits_total": 256.0,
                                              "vllm:prompt_tokens_by_source_total{source=local_cache_hit}": 256.0}
    assert metrics.kvtier_stats(metrics.parse("vllm:prefix_cache_hits_total 3\n")) == {}


def test_metric_names_mirror_kvtier_prom() -> None:
    from kvtier import prom

    assert {k.removesuffix("_total") for k in metrics.CONNECTOR} == {m for m, _ in prom.CONNECTOR_COUNTERS.values()}
    assert {m.removesuffix("_total"): n for m, n in metrics.CONNECTOR.items()} == {
        m: n for n, (m, _) in prom.CONNECTOR_COUNTERS.items()}
    assert {m.removesuffix("_total"): n for m, n in metrics.TIER.items()} == {
        m: n for n, (m, _) in prom.TIER_COUNTERS.items()}
    assert {m.removesuffix("_total"): n for m, n in metrics.PER_TIER_CONNECTOR.items()} == {
        m: n for n, (m, _) in prom.PER_TIER_CONNECTOR.items()}
    assert metrics.USAGE == {m: n for n, (m, _) in prom.USAGE_GAUGES.items()}


def _request(conv: int, turn: int, arrival: float, cached: int | None) -> dict:
    stamps = [arrival + 0.1 + 0.01 * i for i in range(4)]
    return {"conv": conv, "turn": turn, "prompt_len": 300, "arrival_s": arrival, "token_s": stamps,
            "output": [5, 6, 7, 8], "num_cached_tokens": cached or 0, "cached_reported": cached is not None,
            "finish_s": stamps[-1]}


def _round(cached: int | None, server: dict[str, float]) -> dict:
    return {"requests": [_request(0, 0, 0.0, cached), _request(0, 1, 1.0, cached)], "failures": [],
            "wall_s": 2.0, "loadavg_before": (1.0, 1.0, 1.0), "loadavg_after": (1.0, 1.0, 1.0),
            "kvtier_before": {}, "kvtier_after": {}, "server_counters": server}


def test_summary_without_kvtier_counters_says_so() -> None:
    from kvtier_bench.endpoint.markdown import markdown
    from kvtier_bench.endpoint.summary import NOT_REPORTED, summarize_endpoint

    # Per-request cached tokens, no kvtier counters, another connector's hits counted by vLLM.
    server = {"vllm:prompt_tokens_cached_total": 256.0, "vllm:external_prefix_cache_hits_total": 128.0}
    m = summarize_endpoint([_round(128, server) for _ in range(3)], 128)
    assert m["kvtier"] is None and m["kvtier_source"] == NOT_REPORTED
    assert m["hit_tokens_by_tier"] == {"vllm": 3 * 256 - 3 * 128, "connector": 3 * 128}
    assert m["median"]["requests_per_s"] == 1.0 and m["spread"]["ttft_p50_ms"] == [100.0, 100.0]
    # Neither per-request counts nor counters: nothing is made up.
    bare = summarize_endpoint([_round(None, {})], 128)
    assert bare["cached_tokens"] is None and bare["hit_rate"] is None and bare["hit_tokens_by_tier"] == {}
    report = {"command": "kvtier bench --endpoint http://127.0.0.1:1", "machine": "m", "git": "g",
              "settings": {"preset": "small", "rounds": 1, "workload": load_settings("quick").to_dict()["workload"]},
              "workload": {"requests": 2},
              "endpoint": {"url": "http://127.0.0.1:1", "server_version": None, "model": "x", "max_model_len": None,
                           "block_size": 128, "block_size_source": "assumed", "reset": "not reset",
                           "tokenizer": "t"},
              "results": [{"name": "http://127.0.0.1:1", "status": "ok", "error": None, "summary": bare}]}
    text = markdown(report)
    assert "kvtier: not reported by the server" in text and "cached tokens: not reported by the server" in text


# ---- against a real server -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    model = build_model("tiny")
    work = tmp_path_factory.mktemp("endpoint-server")
    (work / "kvtier.yaml").write_text("tiers:\n  - {kind: dram, capacity: 64MiB}\n")
    transfer = {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.connector",
                "kv_role": "kv_both", "kv_connector_extra_config": {"config": str(work / "kvtier.yaml")}}
    port = free_port()
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_OMP_THREADS_BIND=cpu_list())
    log_path = work / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
             "--model", model, "--dtype", "bfloat16", "--max-model-len", "896", "--enforce-eager",
             "--block-size", "128", "--kv-cache-memory-bytes", str(2 * 2**20), "--enable-prompt-tokens-details",
             "--api-key", API_KEY, "--kv-transfer-config", json.dumps(transfer)],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"server exited:\n{log_path.read_text()[-5000:]}"
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        else:
            raise AssertionError(f"server did not start:\n{log_path.read_text()[-5000:]}")
        yield url, model
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def bench(url: str, out: Path, *args: str, key: str = API_KEY) -> tuple[subprocess.CompletedProcess[str], dict]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.yaml").write_text(SETTINGS)
    env = dict(os.environ, **{KEY_ENV: key})
    proc = subprocess.run([sys.executable, "-m", "kvtier", "bench", "--endpoint", url, "--api-key-env", KEY_ENV,
                           "--config", str(out / "settings.yaml"), "--out", str(out), "--no-progress", *args],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    data = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    return proc, data


@pytest.fixture(scope="module")
def runs(server: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    url, _ = server
    work = tmp_path_factory.mktemp("endpoint-runs")
    # Order matters: "warm" leaves the conversations in both caches, "cold" must start without them.
    return {"badkey": bench(url, work / "badkey", key=BAD_KEY),
            "warm": bench(url, work / "warm", "--rounds", "2", "--reset", "vllm"),
            "cold": bench(url, work / "cold"), "dirs": work}


@pytest.mark.e2e
def test_with_a_wrong_key_the_server_refuses_and_nothing_runs(runs: dict) -> None:
    proc, data = runs["badkey"]
    assert proc.returncode != 0 and not data
    assert "HTTP 401" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.e2e
def test_every_request_completes_and_histories_grow_by_the_answers(runs: dict, server: tuple[str, str]) -> None:
    proc, data = runs["warm"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    workload = generate(load_settings("quick", overrides={"workload": {"conversations": 2, "turns": 2}}).workload,
                        load_tokenizer(server[1]))
    row = data["results"][0]
    assert row["name"] == server[0] and row["status"] == "ok" and row["error"] is None
    for rnd in row["rounds"]:
        assert rnd["failures"] == [] and len(rnd["requests"]) == 4
        by_key = {(r["conv"], r["turn"]): r for r in rnd["requests"]}
        for (conv, turn), req in by_key.items():
            assert len(req["output"]) == 32 == req["server_completion_tokens"]
            assert req["token_s"] == sorted(req["token_s"]) and req["token_s"][0] > req["arrival_s"]
            assert req["prompt_echo_matched"] and req["server_prompt_tokens"] == req["prompt_len"]
            segment = workload.conversations[conv].turns[turn].segment
            before = 0 if turn == 0 else by_key[(conv, turn - 1)]["prompt_len"] + 32
            assert req["prompt_len"] == before + len(segment)
    m = row["summary"]
    assert m["requests"] == 8 and m["ttft_ms"]["p50"] > 0 and m["itl_ms"]["p50"] is not None
    assert m["e2e_ms"]["p50"] > m["ttft_ms"]["p50"] and m["requests_per_s"] > 0
    assert set(m["ttft_by_turn_ms"]) == {"0", "1"} and m["failed_requests"] == 0


@pytest.mark.e2e
def test_kvtier_hits_are_read_from_the_servers_metrics(runs: dict) -> None:
    _, data = runs["warm"]
    row = data["results"][0]
    m = row["summary"]
    assert m["kvtier_source"].startswith("server /metrics") and m["cached_tokens_source"].startswith("per request")
    assert data["endpoint"]["block_size"] == 128 and "cache_config_info" in data["endpoint"]["block_size_source"]
    # Round 2 starts with vLLM's prefix cache emptied and kvtier's store kept: kvtier serves the histories.
    second = row["rounds"][1]
    loaded = second["kvtier_after"]["counters"]["loaded_blocks.dram"] - \
        second["kvtier_before"].get("counters", {}).get("loaded_blocks.dram", 0)
    assert loaded > 0
    assert second["server_counters"]["vllm:external_prefix_cache_hits_total"] == loaded * 128
    assert all(r["num_cached_tokens"] >= 512 for r in second["requests"])
    assert m["hit_tokens_by_tier"]["dram"] >= loaded * 128
    assert sum(m["hit_tokens_by_tier"].values()) == m["cached_tokens"]
    table = (runs["dirs"] / "warm" / "results.md").read_text()
    assert f"| {row['name']} |" in table and "dram" in table and "No correctness check" in table
    for png in ("ttft_by_turn.png", "hits_by_tier.png"):
        assert (runs["dirs"] / "warm" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_reset_all_starts_cold(runs: dict) -> None:
    proc, data = runs["cold"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rnd = data["results"][0]["rounds"][0]
    assert rnd["reset"] == "reset vLLM's prefix cache and the connector's store"
    first = min(rnd["requests"], key=lambda r: r["arrival_s"])
    assert first["num_cached_tokens"] == 0  # the warm run left it in both caches: both were emptied


@pytest.mark.e2e
def test_the_api_key_is_never_written(runs: dict) -> None:
    for name in ("badkey", "warm", "cold"):
        proc, _ = runs[name]
        assert API_KEY not in proc.stdout + proc.stderr and BAD_KEY not in proc.stdout + proc.stderr
        for path in (runs["dirs"] / name).glob("results.*"):
            assert API_KEY not in path.read_text()
