"""The hit-path benchmark's summary and report (benchmarks/bench_connector_ttft.py), on made-up repetitions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_connector_ttft as bench


def _rep(scale: float, hooks: float | None = None) -> dict[str, float]:
    rep = {"miss": 1.5 * scale, "resident": 0.02 * (0.8 if hooks else 1), "tier": 0.02 * scale,
           "decode_ttft": 1.5 * scale, "itl": 0.015 * scale}
    if hooks is not None:
        rep["hooks_per_step"] = hooks
    return rep


def test_the_report_pairs_reps_and_shows_the_connectors_time_per_decode_step() -> None:
    raw = {"plain": [_rep(1.0), _rep(1.0), _rep(1.0)],
           "dram": [_rep(1.2, 0.00015), _rep(1.2, 0.00005), _rep(1.2, 0.0001)]}
    summary = bench.summarise(raw, 2049, max_spread=1.5)
    assert summary["valid"]
    assert summary["hit_vs_resident"]["dram"]["ratio"] == 1.2
    assert summary["medians_ms"]["dram"]["hooks_per_step"] == 0.1
    args = argparse.Namespace(size="base", length=2049, reps=3, decode_tokens=128, allocator="kvtier")
    text = bench.report(summary, args, (0.5, 0.6))
    assert summary["hit_vs_own_resident"]["dram"]["ratio"] == 1.5
    assert "| dram | 1800.0 | 16.0 | 24.0 | 1800.0 | 18.0 | 0.100 (0.56% of its ITL) |" in text
    assert "| plain | 1500.0 | 20.0 | 20.0 | 1500.0 | 15.0 | – |" in text
    assert "| dram | 1.200x [1.200, 1.200] | 1.500x [1.500, 1.500] |" in text
    assert "plain included" in text


def test_a_run_whose_prefill_rates_spread_is_invalid() -> None:
    raw = {"plain": [_rep(1.0), _rep(1.0)], "dram": [_rep(1.6, 0.0001), _rep(1.0, 0.0001)]}
    assert not bench.summarise(raw, 2049, max_spread=1.5)["valid"]
