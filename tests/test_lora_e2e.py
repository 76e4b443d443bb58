"""LoRA adapters change the KV of the same prompt: kvtier keys name the adapter, so one adapter's blocks are
never served to another (or to the base model), and a repeat under the same adapter is served from kvtier
with the tokens vLLM gives when its own cache holds that adapter's blocks. Real vLLM LoRA on the CPU build,
with random adapters built locally (tests/e2e/lora_driver.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e.run import full_blocks, run_driver

from kvtier_bench.models import build_model

pytestmark = pytest.mark.e2e
LORA_DRIVER = Path(__file__).parent / "e2e" / "lora_driver.py"
PROMPT_LEN = 520


def test_adapters_never_share_blocks_and_repeats_are_served_exactly(tmp_path: Path) -> None:
    model = build_model("tiny")
    sequence = ["alpha", "beta", "alpha", "beta", "base"]
    kvtier = {"tiers": [{"kind": "dram", "capacity": "64MiB"}]}
    served = run_driver({"model": model, "workdir": str(tmp_path / "a"), "kvtier": kvtier, "sequence": sequence},
                        driver=LORA_DRIVER)["runs"]
    # Reference: plain vLLM that keeps each adapter's blocks resident (no reset), same order of requests.
    plain = run_driver({"model": model, "workdir": str(tmp_path / "b"), "sequence": sequence, "reset": False},
                       driver=LORA_DRIVER)["runs"]
    hit = full_blocks(PROMPT_LEN)
    # 1. beta's first request runs right after alpha's, vLLM's cache emptied: nothing of alpha's may be used.
    assert [r["cached"] for r in served] == [0, 0, hit, hit, 0], served
    assert [r["cached"] for r in plain] == [0, 0, hit, hit, 0], plain
    # 2. Every request's tokens equal plain vLLM's with the same blocks computed or reused.
    assert [r["output"] for r in served] == [r["output"] for r in plain]
    # 3. The adapters do change the tokens (else this test would prove nothing).
    assert len({tuple(r["output"]) for r in plain[:2] + plain[4:]}) == 3
