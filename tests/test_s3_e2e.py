"""Engines share one SeaweedFS bucket and one placement index (redis-server): blocks one engine stores are
hits for another engine that is already running, with the same greedy tokens; a dead index costs misses,
not stalls."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from e2e.run import finish_driver, full_blocks, run_driver, start_driver, wait_for
from servers import S3_ACCESS_KEY, S3_SECRET_KEY, RedisServer, SeaweedServer

from kvtier_bench.models import build_model

pytestmark = pytest.mark.e2e
SCRIPT = {"turns": 1, "system_len": 300, "question_len": 100, "max_tokens": 24}


def shared_config(server: SeaweedServer, prefix: str, index_url: str | None = None) -> dict:
    config: dict = {"tiers": [
        {"kind": "dram", "capacity": "64KiB"},  # smaller than one block: every block is served from S3
        {"kind": "s3", "capacity": 0, "bucket": "kvtier-e2e", "prefix": prefix, "write_through": True,
         "endpoint_url": server.endpoint_url, "region": "us-east-1", "addressing_style": "path",
         "access_key_id": S3_ACCESS_KEY, "secret_access_key": S3_SECRET_KEY},
    ]}
    if index_url:
        config["placement_index"] = {"url": index_url, "key_prefix": prefix, "timeout_s": 0.05}
    return config


def test_second_engine_reuses_first_engines_blocks_from_s3(seaweed_server: SeaweedServer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = build_model("tiny")
    seaweed_server.ensure_bucket("kvtier-e2e")
    config = shared_config(seaweed_server, "e2e")
    # Engine 1 computes the prompt; with a repeat after reset_prefix_cache the block round-trips through S3.
    first = run_driver({"model": model, "kvtier": config, **SCRIPT, "repeat_after_reset": True})
    turn = first["turns"][0]
    assert turn["repeat_cached"] == full_blocks(turn["prompt_len"])
    # Engine 2, another process and hash seed, starts with nothing local: its first prompt comes from S3
    # (listed at start-up).
    second = run_driver({"model": model, "kvtier": config, **SCRIPT}, hash_seed="777")
    assert second["turns"][0]["cached"] == full_blocks(second["turns"][0]["prompt_len"])
    assert second["turns"][0]["output"] == turn["repeat_output"]  # both are hit + same tail computation


def test_a_running_engine_is_served_what_another_engine_stores_later(seaweed_server: SeaweedServer,
                                                                    tmp_path: Path) -> None:
    model = build_model("tiny")
    seaweed_server.ensure_bucket("kvtier-e2e")
    index = RedisServer(tmp_path / "index")
    (tmp_path / "index").mkdir()
    index.start()
    try:
        config = shared_config(seaweed_server, "live", index.url)
        script = {**SCRIPT, "turns": 2, "system_len": 1200, "question_len": 100}
        # 1. Engine B starts first and waits: nothing is stored yet, its start-up listing finds nothing.
        gates = tmp_path / "b"
        gates.mkdir()
        b = start_driver({"model": model, "kvtier": config, **script, "gates": [0, 1]}, gates, hash_seed="31")
        wait_for(gates / "ready-0", b)
        # 2. Engine A computes the conversation (two turns), its blocks written through to S3 and published.
        a = run_driver({"model": model, "kvtier": config, **script})
        # 3. B's first request finds A's blocks through the placement index, one round trip.
        (gates / "go-0").touch()
        wait_for(gates / "ready-1", b)
        # 4. The index dies before B's second turn: its new blocks are misses, computed, and nothing stalls.
        index.stop(signal.SIGKILL)
        (gates / "go-1").touch()
        result = finish_driver(b, gates)
    finally:
        index.stop()
    first, second = result["turns"]
    assert first["cached"] >= 0.9 * full_blocks(first["prompt_len"]), first["cached"]
    assert first["output"] == a["turns"][0]["output"] and second["output"] == a["turns"][1]["output"]
    assert second["cached"] == full_blocks(first["prompt_len"] + 24)  # only what B itself holds
    assert second["wall_s"] < 3 * a["turns"][1]["wall_s"] + 1.0  # a dead index is not a stall
    assert "Traceback" not in result["log"]
