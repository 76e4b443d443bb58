"""The hit-path benchmark's summary and report (benchmarks/bench_connector_ttft.py), on made-up repetitions."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_connector_ttft as bench
from kvtier_bench.inengine import sched, since


def _rep(scale: float, hooks: float | None = None) -> dict[str, float]:
    rep = {"miss": 1.5 * scale, "resident": 0.02 * (0.8 if hooks else 1), "tier": 0.02 * scale,
           "decode_ttft": 1.5 * scale, "itl": 0.015 * scale, "wait_miss": 0.004, "wait_per_step": 0.0001}
    if hooks is not None:  # kvtier's own time: hooks and threads in a miss and per decode step
        rep.update(hooks_miss=0.003, threads_miss=0.012, hooks_per_step=hooks, threads_per_step=0.00005,
                   load=0.003 * scale, floor=0.002)
    return rep


def test_the_report_pairs_reps_and_shows_kvtiers_own_time() -> None:
    raw = {"plain": [_rep(1.0), _rep(1.0), _rep(1.0)],
           "dram": [_rep(1.2, 0.00015), _rep(1.2, 0.00005), _rep(1.2, 0.0001)]}
    summary = bench.summarise(raw, 2049, max_spread=1.5)
    assert summary["valid"]
    assert summary["hit_vs_resident"]["dram"]["ratio"] == 1.2
    assert summary["medians_ms"]["dram"]["hooks_per_step"] == 0.1
    # (1.8 s + 3 ms + 12 ms) / 1.8 s; (18 ms + 0.1 ms + 0.05 ms) / 18 ms on the median rep
    assert summary["own_time"]["dram"]["miss"]["ratio"] == round(1 + 0.015 / 1.8, 4)
    assert summary["own_time"]["dram"]["step"]["ci95"][1] == round(1 + 0.0002 / 0.018, 4)
    args = argparse.Namespace(size="base", length=2049, reps=3, decode_tokens=128, allocator="kvtier")
    text = bench.report(summary, args, (0.5, 0.6))
    assert summary["hit_vs_own_resident"]["dram"]["ratio"] == 1.5
    assert "| dram | 1800.0 | 16.0 | 24.0 | 1800.0 | 18.0 | 3.00 + 12.00 | 0.100 + 0.050 |" in text
    assert "| plain | 1500.0 | 20.0 | 20.0 | 1500.0 | 15.0 | – | – |" in text
    assert "| dram | 1.200x [1.200, 1.200] | 1.500x [1.500, 1.500] |" in text
    assert "| plain | 4.0 | 0.1 | – | – |" in text  # the engine's wait for a CPU; kvtier's extra wait: none here
    assert "| dram | 4.0 | 0.1 | 1.000x [1.000, 1.000] | 1.000x [1.000, 1.000] |" in text
    assert "plain included" in text
    # the load against the machine's floor for its bytes: 3.6 ms / 2 ms; at the floor a hit is 1 + 2 ms / 20 ms
    assert summary["load_vs_floor"]["dram"]["ratio"] == 1.8
    assert summary["floor_hit_vs_resident"]["dram"]["ratio"] == 1.1
    assert "| dram | 3.6 | 2.0 | 1.800x [1.800, 1.800] | 1.100x [1.100, 1.100] | 1.200x [1.200, 1.200] |" in text


def test_a_second_plain_engine_is_a_control_with_only_its_cross_process_ratios() -> None:
    raw = {"plain": [_rep(1.0), _rep(1.0)], "plain-b": [_rep(1.02), _rep(1.02)],
           "dram": [_rep(1.2, 0.0001), _rep(1.2, 0.0001)]}
    summary = bench.summarise(raw, 2049, max_spread=1.5)
    assert "plain-b" not in summary["hit_vs_resident"] and "plain-b" not in summary["own_time"]
    assert summary["miss_overhead"]["plain-b"]["ttft"]["ratio"] == 1.02
    args = argparse.Namespace(size="base", length=2049, reps=2, decode_tokens=128, allocator="kvtier")
    assert "| plain-b | – | – | – | 1.020x [1.020, 1.020] | 1.020x [1.020, 1.020] | 1.020x [1.020, 1.020] | – | – |" \
        in bench.report(summary, args, (0.5, 0.6))


def test_a_run_whose_prefill_rates_spread_is_invalid() -> None:
    raw = {"plain": [_rep(1.0), _rep(1.0)], "dram": [_rep(1.6, 0.0001), _rep(1.0, 0.0001)]}
    assert not bench.summarise(raw, 2049, max_spread=1.5)["valid"]


def test_sched_splits_kvtiers_cpu_from_the_other_threads_wait() -> None:
    done = threading.Event()

    data = bytes(1 << 20)

    def burn(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            hashlib.sha256(data)  # releases the GIL: the threads really compete for the cores, not for the GIL
        done.wait()  # alive while measured

    before = sched()
    # three busy threads on at most two cores: someone waits for a CPU
    threads = [threading.Thread(target=burn, args=(0.3,), name=f"engine-side-{i}") for i in range(2)]
    threads.append(threading.Thread(target=burn, args=(0.1,), name="kvtier-test"))
    for thread in threads:
        thread.start()
    time.sleep(0.8)
    cpu, wait = since(before)
    done.set()
    for thread in threads:
        thread.join()
    assert 0.09 <= cpu <= 0.2  # only kvtier-test's CPU
    if len(os.sched_getaffinity(0)) <= 2:
        assert wait > 0.01  # the engine-side threads waited while three wanted two cores
