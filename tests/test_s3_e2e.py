"""Two vLLM engine processes share one SeaweedFS bucket: the second serves the first's prefix from S3 with the
same greedy tokens a resident prefix hit gives."""

from __future__ import annotations

import pytest
from e2e.run import full_blocks, run_driver
from servers import S3_ACCESS_KEY, S3_SECRET_KEY, SeaweedServer

from kvtier_bench.models import build_model

pytestmark = pytest.mark.e2e
SCRIPT = {"turns": 1, "system_len": 300, "question_len": 100, "max_tokens": 24}


def test_second_engine_reuses_first_engines_blocks_from_s3(seaweed_server: SeaweedServer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = build_model("tiny")
    seaweed_server.ensure_bucket("kvtier-e2e")
    config = {"tiers": [
        {"kind": "dram", "capacity": "64KiB"},  # smaller than one block: every block goes to S3
        {"kind": "s3", "capacity": 0, "bucket": "kvtier-e2e", "prefix": "e2e", "endpoint_url": seaweed_server.endpoint_url,
         "region": "us-east-1", "addressing_style": "path", "access_key_id": S3_ACCESS_KEY,
         "secret_access_key": S3_SECRET_KEY},
    ]}
    # Engine 1 computes the prompt; with a repeat after reset_prefix_cache the block round-trips through S3.
    first = run_driver({"model": model, "kvtier": config, **SCRIPT, "repeat_after_reset": True})
    turn = first["turns"][0]
    assert turn["repeat_cached"] == full_blocks(turn["prompt_len"])
    # Engine 2, another process and hash seed, starts with nothing local: its first prompt comes from S3.
    second = run_driver({"model": model, "kvtier": config, **SCRIPT}, hash_seed="777")
    assert second["turns"][0]["cached"] == full_blocks(second["turns"][0]["prompt_len"])
    assert second["turns"][0]["output"] == turn["repeat_output"]  # both are hit + same tail computation
