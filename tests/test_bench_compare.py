"""The benchmark's cross-configuration comparisons: paired-bootstrap intervals that contain the ratio and
narrow with more requests, round-by-round throughput ratios, the kvtier share of reused tokens, and targets."""

from __future__ import annotations

import random

import pytest
from kvtier_bench.compare import (
    compare,
    kvtier_share,
    throughput_ratio,
    ttft_ratio,
    users_rate,
)


def run(ttft_scale: float, wall: float, seed: int, rounds: int = 3, requests: int = 40) -> dict:
    rng = random.Random(seed)
    out = []
    for _ in range(rounds):
        reqs = [{"conv": c, "turn": 0, "arrival_s": 0.0, "token_s": [ttft_scale * rng.uniform(0.5, 1.5)]}
                for c in range(requests)]
        for r in reqs:
            r["finish_s"] = r["token_s"][0] + 0.5
        out.append({"requests": reqs, "wall_s": wall})
    return {"rounds": out}


def test_ttft_ratio_and_its_interval() -> None:
    fast, slow = run(0.1, 10.0, 1), run(1.0, 20.0, 2)
    r = ttft_ratio(fast, slow)
    assert r["pairs"] == 120 and r["ci95"][0] <= r["ratio"] <= r["ci95"][1]
    assert 0.05 < r["ci95"][0] and r["ci95"][1] < 0.2
    wide = ttft_ratio(run(0.1, 10.0, 1, rounds=1, requests=8), run(1.0, 20.0, 2, rounds=1, requests=8))
    assert wide["ci95"][1] - wide["ci95"][0] > r["ci95"][1] - r["ci95"][0]
    assert throughput_ratio(fast, slow) == {"ratio": 2.0, "range": [2.0, 2.0], "rounds": 3}


def test_targets_are_checked_per_kvtier_configuration() -> None:
    raws = {"reference": run(0.09, 10.0, 3), "vllm-prefix": run(1.0, 20.0, 4), "kvtier-dram": run(0.1, 10.0, 5)}
    rows = [{"name": n, "status": "ok", "summary": {"hit_tokens_by_tier": {"vllm": 300, "dram": 700}}} for n in raws]
    [entry] = compare(rows, raws)
    assert entry["name"] == "kvtier-dram" and entry["kvtier_share"] == 0.7
    met = {t["target"]: t["met"] for t in entry["targets"]}
    assert met == {"TTFT p50 vs vllm-prefix": True, "TTFT p50 vs reference": True,
                   "users' request rate vs vllm-prefix": True, "share of reused tokens from kvtier": True}
    assert kvtier_share({"hit_tokens_by_tier": {"vllm": 0}}) is None


def test_the_users_rate_follows_the_answers_where_the_wall_time_follows_the_pauses() -> None:
    """Two users, the same arrivals and think times: answering 4x faster barely moves the round's wall time
    (the longest chain of pauses) but raises the rate at which the users get their turns done."""
    def rnd(answer_s: float) -> dict:
        reqs, wall = [], 0.0
        for conv, (arrival, thinks) in enumerate([(0.0, [1.0, 1.0]), (0.5, [6.0, 6.0])]):
            now = arrival
            for turn, think in enumerate([0.0, *thinks]):
                now += think
                reqs.append({"conv": conv, "turn": turn, "arrival_s": now, "finish_s": now + answer_s})
                now += answer_s
            wall = max(wall, now)
        return {"requests": reqs, "wall_s": wall}

    fast, slow = rnd(0.5), rnd(2.0)
    assert users_rate(fast) == 3 / 3.5 + 3 / 13.5
    walls = throughput_ratio({"rounds": [fast]}, {"rounds": [slow]})["ratio"]
    users = throughput_ratio({"rounds": [fast]}, {"rounds": [slow]}, users_rate)["ratio"]
    assert walls < 1.35 and users > 1.95


def test_rounds_rotate_the_order_of_the_configurations() -> None:
    from kvtier_bench.runner import round_order

    names = ["reference", "vllm-prefix", "kvtier"]
    orders = [round_order(names, i) for i in range(3)]
    assert orders == [names, ["vllm-prefix", "kvtier", "reference"], ["kvtier", "reference", "vllm-prefix"]]
    # Over as many rounds as configurations, each runs once in every position.
    assert all(sorted(o[position] for o in orders) == sorted(names) for position in range(3))
    assert round_order(names, 3) == names and round_order([], 5) == []


def test_every_engine_gets_the_same_allocator_settings_unless_told_otherwise(monkeypatch) -> None:
    """kvtier's worker sets glibc's allocator in its own process, which speeds up vLLM's work as well: the baselines
    start with the same settings, so a comparison does not credit kvtier with them."""
    from kvtier_bench.configs import RunConfig
    from kvtier_bench.runner import driver_env
    from kvtier_bench.settings import load_settings

    from kvtier.errors import ConfigError

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.check=3")  # the caller's own value never leaks through
    plain = RunConfig("reference", "vLLM, large KV space")
    matched = driver_env(plain, None, False, load_settings("chat").allocator)
    assert matched["GLIBC_TUNABLES"].startswith("glibc.malloc.mmap_threshold=33554432:")
    assert "GLIBC_TUNABLES" not in driver_env(plain, None, False, "default")
    assert load_settings("quick", overrides={"allocator": "default"}).allocator == "default"
    with pytest.raises(ConfigError, match="allocator: expected one of default, kvtier, got 'jemalloc'"):
        load_settings("chat", overrides={"allocator": "jemalloc"})
