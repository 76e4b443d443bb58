"""benchmarks/bench_codecs.py without an engine: the measurement and the reports on synthetic bf16 blocks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_codecs import (  # noqa: E402
    GOAL_DECODE_GBPS,
    GOAL_RATIO,
    measure,
    memcpy_gbps,
    plane_split_gbps,
    settings,
    zstd_threads_check,
)
from codecs_report import machine_info, write_reports  # noqa: E402


def blocks(count: int = 4, values: int = 16384) -> list[bytes]:
    rng = np.random.default_rng(1)
    raw = rng.normal(0, 1, count * values).astype(np.float32).view(np.uint32) >> 16
    return [row.astype(np.uint16).tobytes() for row in raw.reshape(count, values)]


def test_measure_and_report(tmp_path: Path) -> None:
    data = blocks()
    rows = measure(data, settings(sweep=False), reps=2, rep_mib=1)
    assert rows["none"]["ratio"] < 1.0 < rows["planes"]["ratio"]  # none adds its header; planes compresses
    assert all(len(r["decode_GBps"]["runs"]) == 2 and r["decode_GBps"]["median"] > 0 for r in rows.values())
    results = {"command": "python bench_codecs.py", "args": {}, "machine_before": machine_info(),
               "machine_after": machine_info(), "goal": {"ratio": GOAL_RATIO, "decode_GBps": GOAL_DECODE_GBPS},
               "models": {"synthetic": {"blocks": 4, "block_bytes": len(data[0]), "tokens": 0, "source": "test",
                                        "memcpy_GBps": memcpy_gbps(data, 2), "planes_split": plane_split_gbps(data, 2),
                                        "zstd_threads": zstd_threads_check(data, 1), "settings": rows}}}
    write_reports(results, tmp_path)
    saved = json.loads((tmp_path / "codecs.json").read_text())
    assert saved["models"]["synthetic"]["settings"]["planes"]["ratio"] == rows["planes"]["ratio"]
    text = (tmp_path / "codecs.md").read_text()
    assert "| planes | " in text and "python bench_codecs.py" in text
