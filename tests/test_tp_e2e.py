"""Tensor parallelism (TP=2 on the CPU build, one core per rank): each rank saves and loads its own shard of
every block under its own keys; a repeat after vLLM's prefix cache is emptied is served from kvtier with the
tokens a TP=2 engine gives from its own cache; a block poisoned on one rank only is recomputed on both."""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e.run import full_blocks, run_driver

from kvtier_bench.models import build_model

pytestmark = pytest.mark.e2e
SCRIPT = {"turns": 2, "system_len": 600, "question_len": 100, "max_tokens": 16, "repeat_after_reset": True,
          "tensor_parallel_size": 2}


@pytest.fixture(scope="module")
def model() -> str:
    return build_model("tiny")  # 2 KV heads: one per rank


@pytest.fixture(scope="module")
def baseline(model: str) -> dict:
    return run_driver({"model": model, **SCRIPT, "reset": False})


def test_tp2_repeats_are_served_from_kvtier_with_identical_tokens(model: str, baseline: dict,
                                                                  tmp_path: Path) -> None:
    kvtier = {"tiers": [{"kind": "dram", "capacity": "64KiB"},  # smaller than a block: shards go to disk
                        {"kind": "disk", "capacity": "256MiB", "path": str(tmp_path / "disk")}]}
    result = run_driver({"model": model, "kvtier": kvtier, **SCRIPT})
    for turn, base in zip(result["turns"], baseline["turns"]):
        assert base["repeat_cached"] == full_blocks(base["prompt_len"])
        assert turn["repeat_cached"] == full_blocks(turn["prompt_len"]), turn
        assert turn["output"] == base["output"] and turn["repeat_output"] == base["repeat_output"]
    # Two shards per block, one file each.
    blocks = sum(full_blocks(t["prompt_len"]) // 128 for t in result["turns"])
    assert len(list((tmp_path / "disk").rglob("*.kvb"))) >= 2 * (blocks - 5)


def test_a_block_poisoned_on_one_rank_is_recomputed_on_both(model: str, baseline: dict) -> None:
    # Rank 1's shard of block 0 is a forged record; rank 0's is fine. Rank 1 reports the failed load, vLLM
    # recomputes the whole prompt on both ranks: the repeat gives the tokens of a cold prefill.
    kvtier = {"tiers": [{"kind": "plugin_kinds:PoisonDramTier", "capacity": "64MiB", "poison_put": 0,
                         "poison_rank": 1}]}
    result = run_driver({"model": model, "kvtier": kvtier, **SCRIPT, "turns": 1})
    turn = result["turns"][0]
    assert turn["output"] == baseline["turns"][0]["output"]
    assert turn["repeat_output"] == turn["output"]  # recomputed from block 0, like the cold first run
    assert "5 of 5 blocks failed to load" in result["log"] and "Traceback" not in result["log"]
