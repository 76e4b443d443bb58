"""Promotion on hit pays only when the promoted block is hit in the top tier before the top tier evicts it: the
gate measures that and promotes only a sample while it does not pay."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvtier.config import KVTierConfig
from kvtier.errors import ConfigError
from kvtier.tiers.promotion import PromotionGate
from kvtier.tiers.stack import TierStack

BLOCK = 64 * 1024


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def make_stack(tmp_path: Path, promote: object = True) -> TierStack:
    """DRAM for 3 blocks in front of a disk for all of them."""
    cfg = KVTierConfig.from_dict({"promote_on_hit": promote, "tiers": [
        {"kind": "dram", "capacity": "208KiB", "page_size": "16KiB"},
        {"kind": "disk", "capacity": "8MiB", "path": str(tmp_path / "disk"), "codec": "none"},
    ]}, env={})
    return TierStack.from_config(cfg)


def fill(stack: TierStack, n: int) -> dict[int, bytes]:
    data = {i: os.urandom(BLOCK) for i in range(n)}
    for i, raw in data.items():
        assert stack.put(key(i), raw)
    return data


def test_promotions_evicted_unused_close_the_gate_then_only_a_sample_is_promoted(tmp_path: Path) -> None:
    """40 blocks read in turn through a 3-block DRAM tier: each promotion is evicted before its block comes back."""
    stack = make_stack(tmp_path)
    data = fill(stack, 40)
    for _ in range(4):
        for i in range(40):
            found = stack.get(key(i))
            assert found is not None and found[0] == data[i]
    disk = stack.metrics.snapshot()["disk"]
    assert disk["hits"] == 160
    assert disk["promotions"] + disk["promotions_skipped"] == 160
    assert disk["promotions_skipped"] > 80  # shut after ~44 wasted promotions, then 1 in 16
    assert stack.promotion is not None and not stack.promotion.is_open


def test_promotions_that_are_hit_keep_the_gate_open(tmp_path: Path) -> None:
    """Blocks read twice in a row: every promotion is hit in DRAM right after it landed."""
    stack = make_stack(tmp_path)
    data = fill(stack, 40)
    for i in range(40):
        assert stack.get(key(i))[1] == "disk"  # type: ignore[index]
        found = stack.get(key(i))
        assert found == (data[i], "dram")
    snap = stack.metrics.snapshot()
    assert snap["disk"]["promotions"] == 40 and snap["disk"]["promotions_skipped"] == 0
    assert stack.promotion is not None and stack.promotion.is_open and stack.promotion.useful == 40


def test_always_promotes_every_hit(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, "always")
    fill(stack, 40)
    for _ in range(3):
        for i in range(40):
            stack.get(key(i))
    disk = stack.metrics.snapshot()["disk"]
    assert disk["promotions"] == 120 and disk["promotions_skipped"] == 0 and stack.promotion is None


def test_promote_on_hit_takes_true_false_or_always_and_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="promote_on_hit"):
        make_stack(tmp_path, "sometimes")
    assert make_stack(tmp_path, False).promotion is None


def test_the_gate_opens_again_when_sampled_promotions_start_paying() -> None:
    gate = PromotionGate(threshold=0.25, sample=4, window=8)
    for i in range(40):  # every promotion evicted unused
        if gate.admit():
            gate.landed(key(i))
            gate.evicted(key(i))
    assert not gate.is_open and gate.skipped > 0
    admitted = [i for i in range(100, 140) if gate.admit()]
    assert len(admitted) == 10  # 1 in 4 while shut
    for i in admitted[:3]:  # the workload changed: the sampled promotions are hit
        gate.landed(key(i))
        gate.hit(key(i))
    assert gate.is_open and gate.admit()


def test_outcomes_count_only_for_pending_promotions() -> None:
    gate = PromotionGate(threshold=0.5, window=1)
    gate.evicted(key(1))  # never promoted: no outcome
    gate.hit(key(2))
    assert gate.useful == gate.wasted == 0 and gate.is_open
    gate.landed(key(3))
    gate.hit(key(3))
    gate.evicted(key(3))  # its outcome is already in
    assert (gate.useful, gate.wasted) == (1, 0)
    with pytest.raises(ValueError):
        PromotionGate(threshold=2.0)
