"""KVTierConnector on a real vLLM engine (CPU build): identical greedy tokens, hits from each tier,
corruption recomputed, reuse across processes. Each engine runs in its own process (tests/e2e/driver.py).

The reference is plain vLLM whose prefix cache keeps every block resident: a kvtier hit must reproduce
exactly what a resident prefix hit gives. (Comparing a hit against a full recompute is not bit-exact even in
plain vLLM: the attention is split differently, and random-weight models have near-tied logits.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier_bench.models import build_model
from e2e.run import full_blocks, run_driver

pytestmark = pytest.mark.e2e
SCRIPT = {"turns": 4, "system_len": 300, "question_len": 100, "max_tokens": 24, "repeat_after_reset": True}


@pytest.fixture(scope="module")
def model() -> str:
    return build_model("tiny")


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kvtier-disk")


@pytest.fixture(scope="module")
def baseline(model: str) -> dict:
    # Same script, but vLLM's prefix cache is never emptied: every repeat is a resident prefix hit.
    return run_driver({"model": model, **SCRIPT, "reset": False})


def kvtier_config(dram: str, disk_dir: Path) -> dict:
    return {"tiers": [{"kind": "dram", "capacity": dram},
                      {"kind": "disk", "capacity": "512MiB", "path": str(disk_dir), "codec": {"name": "lz4", "shuffle": True}}]}


def outputs(result: dict, key: str = "output") -> list[list[int]]:
    return [turn[key] for turn in result["turns"]]


def test_baseline_repeats_are_resident_hits(baseline: dict) -> None:
    assert all(turn["repeat_cached"] == full_blocks(turn["prompt_len"]) for turn in baseline["turns"])


def test_dram_tier_serves_repeats_with_identical_tokens(model: str, baseline: dict, tmp_path: Path) -> None:
    # In process, so the driver sees vLLM's scheduler: on host KV caches a finished request's blocks are freed in
    # the step that finished it (its save copies are done by then), never held into the next step.
    result = run_driver({"model": model, "kvtier": kvtier_config("256MiB", tmp_path / "disk"), **SCRIPT,
                         "in_process": True})
    assert outputs(result) == outputs(baseline)
    assert outputs(result, "repeat_output") == outputs(baseline, "repeat_output")
    for turn in result["turns"]:
        assert turn["repeat_cached"] == full_blocks(turn["prompt_len"]), turn
        assert turn["held_requests"] == 0, turn
    # Nothing was demoted: the hits came from DRAM.
    assert not list((tmp_path / "disk").rglob("*.kvb"))


def test_disk_tier_serves_repeats_with_identical_tokens(model: str, baseline: dict, disk_dir: Path) -> None:
    # A DRAM tier smaller than one block (one 64 KiB page) sends every block to disk.
    result = run_driver({"model": model, "kvtier": kvtier_config("64KiB", disk_dir), **SCRIPT})
    assert outputs(result) == outputs(baseline)
    assert outputs(result, "repeat_output") == outputs(baseline, "repeat_output")
    for turn in result["turns"]:
        assert turn["repeat_cached"] == full_blocks(turn["prompt_len"]), turn
    assert list(disk_dir.rglob("*.kvb"))


def test_second_process_reuses_disk_blocks(model: str, baseline: dict, disk_dir: Path) -> None:
    # A new engine process, with a different hash seed, starts with an empty vLLM prefix cache: its very
    # first prompt is served from what the previous process saved on disk.
    if not list(disk_dir.rglob("*.kvb")):
        pytest.skip("depends on test_disk_tier_serves_repeats_with_identical_tokens")
    result = run_driver({"model": model, "kvtier": kvtier_config("64KiB", disk_dir), **SCRIPT,
                         "turns": 1, "repeat_after_reset": False}, hash_seed="12345")
    assert result["turns"][0]["cached"] == full_blocks(result["turns"][0]["prompt_len"])
    assert result["turns"][0]["output"] == baseline["turns"][0]["repeat_output"]


def test_corrupted_disk_blocks_are_recomputed(model: str, baseline: dict, disk_dir: Path) -> None:
    # Every stored block is damaged (bytes flipped or files truncated) before the first turn: kvtier must
    # report the failed loads so vLLM recomputes, and the tokens must not change.
    if not list(disk_dir.rglob("*.kvb")):
        pytest.skip("depends on test_disk_tier_serves_repeats_with_identical_tokens")
    result = run_driver({"model": model, "kvtier": kvtier_config("64KiB", disk_dir), **SCRIPT,
                         "repeat_after_reset": False, "corrupt_before_turn": 0, "disk_dir": str(disk_dir)})
    assert result["corrupted_files"] > 0
    assert outputs(result) == outputs(baseline)
    assert "failed to load" in result["log"]


def test_async_load_gives_identical_tokens(model: str, baseline: dict, tmp_path: Path) -> None:
    # With async_load the request waits (WAITING_FOR_REMOTE_KVS) while blocks load between steps.
    config = {**kvtier_config("256MiB", tmp_path / "disk"), "connector": {"async_load": True}}
    result = run_driver({"model": model, "kvtier": config, **SCRIPT})
    assert outputs(result) == outputs(baseline)
    assert outputs(result, "repeat_output") == outputs(baseline, "repeat_output")
    for turn in result["turns"]:
        assert turn["repeat_cached"] == full_blocks(turn["prompt_len"]), turn


@pytest.mark.parametrize("async_load", [False, True], ids=["sync", "async"])
def test_a_poisoned_block_of_a_reused_prefix_is_recomputed(model: str, async_load: bool,
                                                           poisoned_baseline: dict) -> None:
    # Block 2 of the prompt is stored as a forged record (a consistent header claiming 2^40 raw bytes). The
    # repeat loads blocks 0-1, finds block 2 bad and reports it: vLLM recomputes blocks 2-4. The tokens must
    # equal plain vLLM's when it holds blocks 0-1 itself and computes the rest.
    config = {"tiers": [{"kind": "plugin_kinds:PoisonDramTier", "capacity": "64MiB", "poison_put": 2}],
              "connector": {"async_load": async_load}}
    result = run_driver({"model": model, "kvtier": config, **POISON_SCRIPT})
    turn = result["turns"][0]
    assert turn["repeat_output"] == poisoned_baseline["turns"][0]["repeat_output"]
    assert turn["output"] == poisoned_baseline["turns"][0]["output"]
    assert "3 of 5 blocks failed to load" in result["log"]
    assert "Traceback" not in result["log"]


POISON_SCRIPT = {"turns": 1, "system_len": 600, "question_len": 100, "max_tokens": 24, "repeat_after_reset": True}


@pytest.fixture(scope="module")
def poisoned_baseline(model: str) -> dict:
    return run_driver({"model": model, **POISON_SCRIPT, "prime_blocks": 2})
