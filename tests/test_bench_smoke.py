"""Smoke test of ``kvtier bench``: the small preset cut to 2 conversations x 2 turns, the reference and one kvtier
configuration (two engine starts), checked for the report's structure and for the correctness check.

vLLM's KV space is the smallest the engine accepts for max_model_len 896 (8 blocks of 128 tokens), so the
second conversation pushes the first one's history out of vLLM's own cache and kvtier has to serve it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SETTINGS = """\
preset: small
workload: {conversations: 2, turns: 2, answer_tokens: 32}
engine: {kv_cache_bytes: 2MiB, max_model_len: 896}
configs: [kvtier-dram, lmcache]
timeout_s: 600
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("bench")
    settings = out / "settings.yaml"
    settings.write_text(SETTINGS)
    proc = subprocess.run([sys.executable, "-m", "kvtier", "bench", "--config", str(settings), "--out", str(out),
                           "--no-progress"], check=False, capture_output=True, text=True, timeout=900)
    assert (out / "results.json").exists(), f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads((out / "results.json").read_text()), out, proc


def by_name(report: dict) -> dict[str, dict]:
    return {row["name"]: row for row in report["results"]}


def test_runs_and_writes_table_and_plots(report: tuple[dict, Path, subprocess.CompletedProcess[str]]) -> None:
    data, out, proc = report
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "results.md").read_text()
    assert "| config | TTFT p50 / p90 / p99 ms" in table and "| kvtier-dram |" in table
    for png in ("ttft_by_turn.png", "hits_by_tier.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["plots"] == ["ttft_by_turn.png", "hits_by_tier.png"]
    assert data["settings"]["workload"]["conversations"] == 2 and data["workload"]["requests"] == 4


def test_every_configuration_has_metrics(report: tuple[dict, Path, subprocess.CompletedProcess[str]]) -> None:
    rows = by_name(report[0])
    assert [name for name, row in rows.items() if row["status"] == "ok"] == ["reference", "kvtier-dram"]
    for row in rows.values():
        if row["status"] != "ok":
            continue
        m = row["summary"]
        assert m["requests"] == 4
        assert set(m["ttft_ms"]) == {"p50", "p90", "p99", "mean"} and m["ttft_ms"]["p50"] > 0
        assert set(m["ttft_by_turn_ms"]) == {"0", "1"} and all(t["n"] == 2 for t in m["ttft_by_turn_ms"].values())
        assert m["itl_ms"]["p50"] > 0 and m["e2e_ms"]["p50"] >= m["ttft_ms"]["p50"] * 0.5
        assert m["requests_per_s"] > 0 and m["output_tokens_per_s"] > 0 and m["peak_rss_bytes"] > 0
        assert m["rounds"] == 1 and len(row["rounds"]) == 1 and len(row["check_requests"]) == 4
        for req in row["rounds"][0]["requests"]:
            assert len(req["output"]) == 32 and req["token_s"] == sorted(req["token_s"])
            assert req["token_s"][0] > req["arrival_s"]
        assert sum(m["hit_tokens_by_tier"].values()) == m["cached_tokens"]
    kv = rows["kvtier-dram"]["summary"]["kvtier"]
    assert kv["saved_bytes"] > 0 and kv["load_failed_blocks"] == 0 and "dram" in kv["usage"]
    # Turn 1 re-uses the history: the second turn of each conversation hits.
    assert rows["kvtier-dram"]["summary"]["hit_rate_by_turn"]["1"] > 0.5


def test_unavailable_baseline_is_reported(report: tuple[dict, Path, subprocess.CompletedProcess[str]]) -> None:
    row = by_name(report[0])["lmcache"]
    if row["status"] == "ok":
        pytest.skip("lmcache is installed and started here")
    assert row["status"] == "not supported here" and row["error"]
    assert f"**lmcache**: not supported here: {row['error']}" in (report[1] / "results.md").read_text()


def test_correctness_check_passes_with_kvtier_serving_blocks(
        report: tuple[dict, Path, subprocess.CompletedProcess[str]]) -> None:
    check = by_name(report[0])["kvtier-dram"]["check"]
    assert check["passed"], check
    # Every request of the correctness pass re-used exactly what the reference re-used, tokens were
    # identical, and some of those tokens came out of kvtier (not only vLLM's own cache).
    assert check["strict"] == check["strict_identical"] == 4, check
    assert check["strict_with_hits"] >= 2 and check["kvtier_loaded_blocks"] >= 1, check
    assert check["timed_run"]["compared"] >= 2
